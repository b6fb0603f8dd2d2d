"""The authors' evaluation storage and image geometry as options (issue 32, items 5 and 6):
evaluation.sample_format (png | jpeg75), crop (center | none) for stage i, the classifiers and
the metrics' real images, and the classifiers' augment (ours | flips)."""

import io

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_models import tiny_sd_config

import rl4med.classifiers.train as classifier_mod
import rl4med.stage_i.finetune as finetune_mod
from rl4med.attributes import ATTRIBUTES
from rl4med.classifiers.train import ClassifierSettings, augment, derived_seed
from rl4med.data.images import balanced_order, load_image, manifest_loader, to_float
from rl4med.data.manifest import read_manifest, write_manifest
from rl4med.evaluation.frechet import (
    FD_JUDGE_LABEL,
    group_statistics,
    judge_space,
    load_space,
    load_statistics,
    model_fd,
    real_statistics,
)
from rl4med.evaluation.perceptual import load_lpips, lpips_distances, lpips_table, pair_with_real
from rl4med.evaluation.samples import (
    SamplingSettings,
    generate_samples,
    read_samples,
    sample_index,
    sample_seeds,
)
from rl4med.evaluation.storage import (
    as_stored,
    metric_label_suffix,
    real_image,
    sample_rounding,
    sample_suffix,
)
from rl4med.models.classifier import AttributeClassifier, ClassifierSpec, create_backbone
from rl4med.models.sd import build_tiny_sd
from rl4med.prompts import prompt_from_slug
from rl4med.sampling import sample_images, to_uint8
from rl4med.tracking import make_accelerator

JPEG_SUFFIX = metric_label_suffix("jpeg75")


def _pil_jpeg75(image: np.ndarray) -> np.ndarray:
    """``image`` saved by PIL as JPEG with quality=75 given explicitly, read back."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=75)
    return np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


# ------------------------------------------------------------------------------ quantisation


def test_floor_truncates_as_the_authors_astype_and_round_rounds():
    # x * 255 for x = (v + 1) / 2: levels chosen where round and floor differ
    levels = torch.tensor([0.0, 10.4, 10.6, 127.5, 200.7, 254.8, 255.0])
    v = (levels / 255 * 2 - 1).view(1, 1, 1, -1).expand(1, 3, 1, -1)
    assert to_uint8(v, "round")[0, 0, :, 0].tolist() == [0, 10, 11, 128, 201, 255, 255]
    assert to_uint8(v, "floor")[0, 0, :, 0].tolist() == [0, 10, 10, 127, 200, 254, 255]
    assert to_uint8(v).tolist() == to_uint8(v, "round").tolist()  # round unless asked
    # exactly the authors' numpy expression on their float16 image in [0, 1], over a sweep
    sweep = torch.linspace(-1.2, 1.2, 20001).view(1, 1, 1, -1).expand(1, 3, 1, -1)
    x16 = (sweep.half() / 2 + 0.5).clamp(0, 1)
    theirs = (x16.numpy().transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    assert np.array_equal(to_uint8(sweep, "floor"), theirs)
    # float16 products that round up to the next level land there, as in theirs (float32: 127)
    near = torch.tensor([127.99 / 255 * 2 - 1, 254.99 / 255 * 2 - 1]).view(1, 1, 1, 2)
    assert to_uint8(near.expand(1, 3, 1, 2), "floor")[0, 0, :, 0].tolist() == [128, 255]
    assert sample_rounding("png") == "round" and sample_rounding("jpeg75") == "floor"
    with pytest.raises(ValueError, match="rounding 'ceil'"):
        to_uint8(v, "ceil")
    with pytest.raises(ValueError, match="evaluation.sample_format 'gif'"):
        sample_suffix("gif")


def test_a_jpeg75_sample_is_the_floored_image_as_pil_quality_75_gives_it(tmp_path):
    sd = build_tiny_sd(tiny_sd_config(), 32)
    prompt = prompt_from_slug("mel__gel-ruler")
    args = dict(samples_per_prompt=3, seed=1, num_steps=2, guidance_scale=2.0, batch_size=2)
    jpeg = SamplingSettings(sample_format="jpeg75", **args)
    rows = generate_samples(sd, prompt, jpeg, tmp_path / "j")
    generate_samples(sd, prompt, SamplingSettings(**args), tmp_path / "p")  # png, the default
    jpeg, index = read_samples(tmp_path / "j")
    png, png_index = read_samples(tmp_path / "p")
    assert index["file"].tolist() == [r["file"] for r in rows] == [f"0000{i}.jpg" for i in range(3)]
    assert png_index["file"].tolist() == [f"0000{i}.png" for i in range(3)]
    with Image.open(tmp_path / "j" / "00000.jpg") as im:
        assert im.format == "JPEG"
    seeds = sample_seeds(prompt, 3, 1)
    # in the jobs' batches of 2: a batch of 3 may round a pixel otherwise (CPU kernels differ
    # by batch size: seen on an AVX2-only CPU)
    floored = sample_images(sd, [prompt] * 3, seeds, 2, 2.0, 1.0, batch_size=2, rounding="floor")
    rounded = sample_images(sd, [prompt] * 3, seeds, 2, 2.0, 1.0, batch_size=2)
    assert np.array_equal(png, rounded)  # png: lossless, rounded, as before the key
    assert np.array_equal(jpeg, np.stack([_pil_jpeg75(x) for x in floored]))
    assert np.array_equal(jpeg, np.stack([as_stored(x, "jpeg75") for x in floored]))
    assert not np.array_equal(jpeg, floored)  # lossy
    assert np.array_equal(as_stored(floored[0], "png"), floored[0])
    assert sample_index([tmp_path / "j"])["path"].str.endswith(".jpg").all()


# ------------------------------------------------------------------------------ real images


def _marked(width=64, height=48, seed=0):
    """A 4:3 image of texture with a red 8 x 8 block in its top-left corner."""
    rng = np.random.default_rng(seed)
    image = rng.integers(40, 200, (height, width, 3)).astype(np.uint8)
    image[:8, :8] = (255, 0, 0)
    return image


def _manifest(tmp_path, n=6):
    """n marked 4:3 images (half mel__hair, half nv__none; train, val and test)."""
    rows = []
    for k in range(n):
        slug = "mel__hair" if k % 2 else "nv__none"
        name = f"img{k}.jpg"
        Image.fromarray(_marked(seed=k)).save(tmp_path / name, quality=95)
        labels = dict(zip(ATTRIBUTES, prompt_from_slug(slug).labels, strict=True))
        rows.append(
            {"image_id": name, "path": name, "split": ["train", "val", "test"][k % 3], **labels}
        )
    write_manifest(pd.DataFrame(rows), tmp_path / "manifest.csv")
    return tmp_path / "manifest.csv"


def _red(image):
    """Is the top-left pixel the marker's red?"""
    r, g, b = (int(c) for c in image[0, 0])
    return r > 200 and g < 60 and b < 60


def test_crop_none_squashes_a_4_by_3_image_and_center_cuts_its_edges(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(_marked()).save(path)
    squashed, centre = load_image(str(path), 32, crop="none"), load_image(str(path), 32)
    assert squashed.shape == centre.shape == (32, 32, 3)
    assert _red(squashed) and not _red(centre)  # the corner survives only without the crop
    with pytest.raises(ValueError, match="crop 'middle'"):
        load_image(str(path), 32, crop="middle")


def test_classifiers_and_stage_i_read_their_crop_key_and_default_to_the_centre(tmp_path):
    manifest = read_manifest(_manifest(tmp_path))

    def settings(**keys):
        base = {"architecture": "resnet10t", "image_size": 32, "seed": 0, "epochs": 1}
        return ClassifierSettings.from_config(
            {**base, "batch_size": 6, "learning_rate": 0.1, **keys}
        )

    assert settings().crop == "center" and settings(crop="none").crop == "none"
    assert settings().augment == "ours" and settings(augment="flips").augment == "flips"
    with pytest.raises(ValueError, match="classifier.augment 'all'"):
        settings(augment="all")
    for cfg, red in (({}, False), ({"crop": "center"}, False), ({"crop": "none"}, True)):
        loader = manifest_loader(manifest, 32, 6, crop=settings(**cfg).crop)
        images, _ = next(iter(loader))
        assert all(_red(x.permute(1, 2, 0).numpy()) == red for x in images), cfg
    # stage i: the training set built by finetune's setup follows finetune_sd.crop
    base = {"seed": 0, "max_steps": 1, "batch_size": 2, "learning_rate": 1e-3}
    accel = make_accelerator(torch.device("cpu"))
    for cfg, red in ((base, False), ({**base, "crop": "none"}, True)):
        sd = build_tiny_sd(tiny_sd_config(), 32)
        settings = finetune_mod.FinetuneSettings.from_config(cfg)
        run = finetune_mod._setup(
            sd, tmp_path / "manifest.csv", tmp_path / "ck", settings, accel, 0, "run"
        )
        image, _ = run.data[0]
        assert _red(image.permute(1, 2, 0).numpy()) == red, cfg
    with pytest.raises(ValueError, match="finetune_sd.crop 'edge'"):
        finetune_mod.FinetuneSettings.from_config({**base, "crop": "edge"})


def _judge():
    torch.manual_seed(0)
    spec = ClassifierSpec(architecture="resnet10t", image_size=32, thresholds=[0.5] * 6)
    return AttributeClassifier(spec, create_backbone("resnet10t")).eval()


def test_fd_real_images_go_through_jpeg75_when_the_key_says_so(tmp_path):
    real = read_manifest(_manifest(tmp_path))
    labels = real[list(ATTRIBUTES)].to_numpy()
    judge = _judge()
    cpu = torch.device("cpu")
    png_space, jpeg_space = (
        judge_space(judge),
        load_space(None, lambda: judge, cpu, False, "jpeg75"),
    )
    assert png_space.label == FD_JUDGE_LABEL and jpeg_space.label == FD_JUDGE_LABEL + JPEG_SUFFIX
    real_statistics(real, png_space, 32, tmp_path / "png.npz", batch_size=4)
    real_statistics(
        real, jpeg_space, 32, tmp_path / "jpeg.npz", batch_size=4, sample_format="jpeg75"
    )
    png, _, png_label = load_statistics(tmp_path / "png.npz")
    jpeg, _, jpeg_label = load_statistics(tmp_path / "jpeg.npz")
    assert jpeg_label == jpeg_space.label
    # the whole image decoded at full size, squashed, then stored and read back as JPEG q75
    expected = np.stack(
        [_pil_jpeg75(load_image(p, 32, crop="none", draft=False)) for p in real["path"]]
    )
    assert np.array_equal(
        expected, np.stack([real_image(p, 32, "none", "jpeg75") for p in real["path"]])
    )
    direct, _ = group_statistics(jpeg_space.extract(expected), labels)
    assert np.allclose(jpeg["all"]["mu"], direct["all"]["mu"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(jpeg["all"]["mu"], png["all"]["mu"], rtol=1e-4, atol=1e-6)
    # png: the real images exactly as before the key (crop none, draft decode, no re-encode)
    before = np.stack([load_image(p, 32, crop="none") for p in real["path"]])
    assert np.array_equal(before, np.stack([real_image(p, 32) for p in real["path"]]))
    # statistics of one storage are never compared with the other's
    samples = np.stack([_marked(32, 32, seed=s) for s in range(4)])
    with pytest.raises(ValueError, match="cached statistics are"):
        model_fd(tmp_path / "png.npz", jpeg_space, [(samples, labels[:4])])
    assert (
        model_fd(tmp_path / "jpeg.npz", jpeg_space, [(samples, labels[:4])])["metric"]
        == jpeg_space.label
    ).all()
    centre = load_space(None, lambda: judge, cpu, False, "png", "center")
    assert centre.label == FD_JUDGE_LABEL + ", real images centre-cropped"


def _sample_folder(folder, slug, images):
    folder.mkdir(parents=True)
    rows = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.jpg")
        rows.append({"file": f"{i:05d}.jpg", "prompt": slug, "sample": i, "seed": i})
    pd.DataFrame(rows).to_csv(folder / "index.csv", index=False)
    return str(folder)


def test_lpips_real_partners_go_through_jpeg75_when_the_key_says_so(tmp_path):
    real = read_manifest(_manifest(tmp_path))
    samples = np.stack([_marked(32, 32, seed=10 + s) for s in range(4)])
    folders = [
        _sample_folder(tmp_path / "s" / "nv__none", "nv__none", samples[:2]),
        _sample_folder(tmp_path / "s" / "mel__hair", "mel__hair", samples[2:]),
    ]
    index = sample_index(folders)
    model, label = load_lpips("alex", None, torch.device("cpu"))
    png = lpips_table(model, label, index, real, None, 0, batch_size=2)
    jpeg = lpips_table(model, label, index, real, None, 0, batch_size=2, sample_format="jpeg75")
    assert (png["metric"] == label).all() and (jpeg["metric"] == label + JPEG_SUFFIX).all()
    pairs = pair_with_real(index["prompt"].tolist(), real, None, 0)
    stored = read_samples(folders[0])[0]  # the .jpg samples read as they are, both ways
    assert stored.shape == (2, 32, 32, 3)
    reads = np.concatenate([read_samples(f)[0] for f in folders])
    partners = np.stack([_pil_jpeg75(load_image(p, 32, "none", draft=False)) for _, p in pairs])
    direct = lpips_distances(model, reads[[r for r, _ in pairs]], partners)
    table = jpeg.set_index("prompt")
    n = (table["n_pairs"] * table["lpips"]).sum() / table["n_pairs"].sum()
    assert n == pytest.approx(direct.mean(), rel=1e-5)
    assert not np.allclose(png["lpips"], jpeg["lpips"])


# ------------------------------------------------------------------------------ augmentation


def _asymmetric(b=8, size=16):
    """Images with no symmetry: every flip and turn of one differs from the others."""
    x = torch.linspace(-1, 1, size * size * 3).view(3, size, size)
    return torch.stack([x.roll(k, dims=-1) for k in range(b)])


def test_augment_flips_only_flips_each_image_and_never_turns_or_jitters():
    x = _asymmetric()
    flips = [lambda z: z, lambda z: z.flip(-1), lambda z: z.flip(-2), lambda z: z.flip(-1).flip(-2)]
    turns = [
        lambda z: z.transpose(-1, -2),
        lambda z: torch.rot90(z, 1, (-2, -1)),
        lambda z: torch.rot90(z, 3, (-2, -1)),
        lambda z: z.transpose(-1, -2).flip(-1).flip(-2),
    ]
    seen = set()
    for seed in range(200):
        out = augment(x, torch.Generator().manual_seed(seed), 0.0, 0.0, "flips")
        for i in range(len(x)):
            hits = [k for k, f in enumerate(flips) if torch.equal(out[i], f(x[i]))]
            assert len(hits) == 1, (seed, i)  # exactly a flip of the image, values untouched
            assert not any(torch.equal(out[i], t(x[i])) for t in turns)
            seen.add(hits[0])
    assert seen == {0, 1, 2, 3}  # every flip drawn, per image
    ours = [augment(x, torch.Generator().manual_seed(s), 0.0, 0.0) for s in range(20)]
    assert any(not any(torch.equal(o[0], f(x[0])) for f in flips) for o in ours)  # turns, jitter
    with pytest.raises(ValueError, match="augment 'rot'"):
        augment(x, torch.Generator().manual_seed(0), 0.0, 0.0, "rot")


def _augment_before_the_key(x, gen, noise_max, blur_p):
    """classifier.augment as it was before the augment key (commit e369154), verbatim."""
    b, dev = x.shape[0], x.device

    def rand(*shape):
        return torch.rand(shape, generator=gen, device=dev)

    if rand() < 0.5:
        x = x.flip(-1)
    if rand() < 0.5:
        x = x.flip(-2)
    x = torch.rot90(x, int(torch.randint(0, 4, (), generator=gen, device=dev)), dims=(-2, -1))
    scale = 1 + 0.15 * (rand(b, 1, 1, 1) * 2 - 1)
    shift = 0.1 * (rand(b, 1, 1, 1) * 2 - 1)
    x = x * scale + shift
    if blur_p > 0:
        blur = rand(b) < blur_p
        if blur.any():
            k = torch.tensor([0.25, 0.5, 0.25], device=dev, dtype=x.dtype)
            kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
            x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    sigma = rand(b, 1, 1, 1) * noise_max
    x = x + sigma * torch.randn(x.shape, generator=gen, device=dev)
    return x.clamp(-1, 1)


def test_a_classifier_without_the_new_keys_trains_on_the_same_batch_as_before(
    tmp_path, monkeypatch
):
    """crop and augment left out: the first training batch is bit-identical to the code before
    the keys (centre crop, ours); the explicit defaults give the same, the authors' differ."""
    path = _manifest(tmp_path, n=12)
    train = read_manifest(path, "train")
    cfg = {
        "architecture": "resnet10t",
        "image_size": 32,
        "seed": 3,
        "epochs": 1,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "max_pos_weight": 10.0,
        "noise_max": 0.2,
        "blur_p": 0.5,
        "mixed_precision": "no",
    }
    seen = {}

    def first_batch(x, *args):
        seen["x"] = augment(x, *args)
        raise StopIteration  # the batch is all this test needs

    monkeypatch.setattr(classifier_mod, "augment", first_batch)
    batches = {}
    for name, extra in (
        ("absent", {}),
        ("explicit", {"crop": "center", "augment": "ours"}),
        ("authors", {"crop": "none", "augment": "flips"}),
    ):
        settings = ClassifierSettings.from_config({**cfg, **extra})
        run = classifier_mod._setup(settings, train, torch.device("cpu"))
        with pytest.raises(StopIteration):
            classifier_mod._train_epoch(run, train, settings, 0)
        batches[name] = seen["x"]
    order = balanced_order(train[list(ATTRIBUTES)].to_numpy(), 3, 0, 0.0)[:4]
    images = np.stack([load_image(train["path"].iloc[i], 32) for i in order])
    x = to_float(torch.from_numpy(images).permute(0, 3, 1, 2))
    before = _augment_before_the_key(
        x, torch.Generator().manual_seed(derived_seed(3, 0, 0)), 0.2, 0.5
    )
    assert torch.equal(batches["absent"], before)
    assert torch.equal(batches["explicit"], before)
    assert not torch.equal(batches["authors"], before)
