import os
import sys

from snakemake import __version__ as SNAKEMAKE_VERSION
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate
from snakemake_interface_executor_plugins.settings import DeploymentMethod

# No model hub at run time: every weight comes from a local path in the config.
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
# glibc's allocator keeps its default here. A fixed MALLOC_MMAP_THRESHOLD_ of 1 MB (every block
# of 1 MB and more mmapped and returned when freed) made peak memory reproducible to the MB
# (tests/test_scale.py still sets it, for that measurement) but every job slower: measured on
# the demo's stage i, 30 steps 41 s against 22 s with the default (32 MB: 26 s); DDPO and the
# generate jobs paid too. The streaming jobs' memory stays bounded either way (test_scale.py).


# the package's stdlib-only modules (config messages, the one prompt builder), importable here
sys.path.insert(0, os.path.join(workflow.basedir, "src"))
from rl4med.config import invalid_key
from rl4med.hpc import snakemake_mismatch


def validate_config(cfg):
    """Validate against the schema (filling defaults); on error, name the key in one line."""
    try:
        validate(cfg, schema="../schemas/config.schema.yaml", set_default=True)
    except WorkflowError as err:
        key, what = invalid_key(str(err))
        raise WorkflowError(
            f"Invalid config at key '{key}': {what}. "
            "The keys and their types are in schemas/config.schema.yaml."
        ) from None


validate_config(config)

from rl4med.evaluation.judges import check_panel
from rl4med.prompts import all_slugs
from rl4med.methods import method_arms
from rl4med.sweep import BASELINE, expand_grid

PROMPT_SLUGS = all_slugs()
# the prompts the evaluation samples (all 32 unless the config names a subset)
EVAL_SLUGS = config["evaluation"]["prompts"] or PROMPT_SLUGS
_unknown = sorted(set(EVAL_SLUGS) - set(PROMPT_SLUGS))
if _unknown:
    raise WorkflowError(
        f"Invalid config at key 'evaluation.prompts': unknown prompt slugs {_unknown}; "
        f"the 32 slugs are {', '.join(PROMPT_SLUGS)}"
    )

# The judge panel (evaluation.judges): every judge scores every sample; the headline is the
# panel's smallest gain. A judge of the reward's architecture is refused unless allowed.
try:
    PANEL = check_panel(
        config["classifier"],
        config["evaluation"]["judges"],
        config["evaluation"]["allow_reward_architecture"],
    )
except ValueError as err:
    raise WorkflowError(f"Invalid config: {err}") from None
JUDGES = list(PANEL)
CLASSIFIERS = ["reward", *JUDGES]
# a held-out judge that watches stage ii (ddpo.stop_judge): trained as the others, never a judge
# of the panel (the evaluation would then grade what stopped the training)
STOP_JUDGE = config["ddpo"].get("stop_judge")
if STOP_JUDGE and (STOP_JUDGE not in config["classifier"] or STOP_JUDGE in CLASSIFIERS):
    raise WorkflowError(
        f"Invalid config at key 'ddpo.stop_judge': {STOP_JUDGE!r} must be a key of classifier "
        f"that is neither the reward nor a judge of evaluation.judges ({', '.join(JUDGES)})"
    )
STOP_JUDGE_INPUT = {"stop_judge": f"results/models/classifier_{STOP_JUDGE}"} if STOP_JUDGE else {}


# real images as the stage-i sampler draws them: the training set of judges with
# `train_on: sampler_view` (rule sampler_view)
SAMPLER_VIEW_MANIFEST = "results/data/sampler_view/manifest.csv"


def classifier_manifest(wildcards):
    """The manifest a classifier trains on: the real images, or their sampler view."""
    train_on = config["classifier"][wildcards.role].get("train_on", "real")
    return SAMPLER_VIEW_MANIFEST if train_on == "sampler_view" else MANIFEST


def classifier_dirs(names=CLASSIFIERS):
    """Classifier name -> its folder, for a rule's named inputs."""
    return {name: f"results/models/classifier_{name}" for name in names}


# Apptainer image of all rules with --sdm apptainer (a .sif path or a docker URI); null = none.
# containers/rl4med.def (CUDA 13.0, driver >= 580) or rl4med-cu128.def (CUDA 12.8, driver >= 570):
# pick one with --config container=containers/rl4med-cu128.sif (docs/cluster.md).
CONTAINER = config["container"]

# Each job's script unpickles what the host's Snakemake wrote with the container's Snakemake:
# with an image, stop now if their major.minor differ, not in every job after its queue wait.
if CONTAINER and DeploymentMethod.APPTAINER in workflow.deployment_settings.deployment_method:
    with open(os.path.join(workflow.basedir, "containers", "constraints.txt")) as f:
        _problem = snakemake_mismatch(SNAKEMAKE_VERSION, f.read())
    if _problem:
        raise WorkflowError(_problem)

DATA_SOURCE = config["data"]["source"]
MANIFEST = "results/data/manifest.csv"
TABLE1 = "results/data/table1.tsv"
# images of the ISIC split files that were not found (listed, counted in Table 1)
MISSING_IMAGES = "results/data/missing_images.tsv"
# the authors' split files, shipped with the workflow (data.isic2019.splits: official)
OFFICIAL_SPLITS = os.path.join(workflow.basedir, "resources", "isic2019-official-splits")


def isic2019_settings(cfg):
    """The ISIC adapter's settings, `splits: official` resolved to the shipped folder."""
    return {**cfg, "splits": OFFICIAL_SPLITS} if cfg.get("splits") == "official" else cfg


# The base model of stage i. Tiny: the folder that build_sd writes. Pretrained: a local SD v1.5
# folder, passed as a param so that the paper-scale config dry-runs where the weights are not.
SD_KIND = config["sd"]["kind"]
SD_BASE_INPUT = "results/models/sd_base" if SD_KIND == "tiny" else []
# tiny mode's autoencoder: the lossless patch autoencoder, or a tiny AutoencoderKL that
# vae_pretrain trains first
TINY_AUTOENCODER = config["sd"].get("tiny", {}).get("autoencoder", "patch")
TINY_VAE_INPUT = "results/models/vae" if TINY_AUTOENCODER == "kl" else []


def sd_base_path(wildcards, input):
    """Folder of the stage-i base model."""
    return input.base if SD_KIND == "tiny" else config["sd"]["path"]


# The authors' published weights (config `published`, rules/published.smk): their stage-i UNet,
# H6 reward and H4 APR classifiers are imported instead of trained; SD+RL is their LoRA merged,
# or, when ddpo.max_iterations exceeds the LoRA's iterations, DDPO continues from it. Their
# paths are params, not inputs, so the config dry-runs where the files are not.
PUBLISHED = config.get("published") or {}
PUBLISHED_LORA_ITERATIONS = int(PUBLISHED.get("lora_iterations", 51)) if PUBLISHED else 0
# does the ddpo rule run (always without published weights; with them only to continue)?
RUN_DDPO = not PUBLISHED or config["ddpo"]["max_iterations"] > PUBLISHED_LORA_ITERATIONS


# With published weights, DDPO continues their LoRA (a run input, not a ddpo setting): the
# LoRA to start from and the iterations it was trained for. Absent otherwise, so a run without
# published weights keeps its params.
DDPO_CONTINUATION = (
    {"continuation": {"init_lora": PUBLISHED["lora"], "start_iteration": PUBLISHED_LORA_ITERATIONS}}
    if PUBLISHED
    else {}
)


# evaluation: SD (stage i) and SD+RL (stage ii) sampled from the same noise, by these keys
GENERATE_KEYS = ("seed", "samples_per_prompt", "num_steps", "guidance_scale", "eta", "batch_size")
# How samples are stored (evaluation.sample_format: png | jpeg75) and the metrics' real images
# read (evaluation.crop: none | center). Neither has a schema default (absent: png, none, as
# before the keys): a rule's params carry them only where the config sets them, so a run from
# before them keeps its params and none of its jobs is redone.
SAMPLE_FORMAT_KEY = {
    k: config["evaluation"][k] for k in ("sample_format",) if k in config["evaluation"]
}
REAL_IMAGE_KEYS = {
    k: config["evaluation"][k] for k in ("sample_format", "crop") if k in config["evaluation"]
}
# sd.compile and sd.channels_last (issue 35): how fast the sampling rules and DDPO's sampling
# run. No schema default: only the switched-on options enter a rule's params (as `speed`), so a
# config that leaves them out or off keeps its params and reruns nothing.
SPEED = {k: True for k in ("compile", "channels_last") if config["sd"].get(k)}
SPEED_PARAMS = {"speed": SPEED} if SPEED else {}
MODEL_DIRS = {"sd": "results/models/sd", "sd_rl": "results/models/sd_rl"}
EVAL_MODELS = list(MODEL_DIRS)
SD_IMAGE_SIZE = (
    config["sd"]["tiny"]["image_size"] if SD_KIND == "tiny" else config["sd"].get("image_size", 512)
)
# augmentation experiment (Table 4): training sets and the model whose samples they add
AUG_MODEL = {"real": None, "real_sd": "sd", "real_sd_rl": "sd_rl"}
AUG_SETS = list(AUG_MODEL)
AUG_RUNS = [(a, int(s)) for a in AUG_SETS for s in config["augmentation"]["seeds"]]


# DDPO sweep (optional): one ddpo_sweep job per combination of config["sweep"]["grid"], each
# model evaluated on the sweep's prompts against the stage-i model ("sweep-baseline": the SD
# samples of those prompts)
SWEEP = config.get("sweep") or {}
try:
    SWEEP_SETTINGS = expand_grid(SWEEP["grid"]) if SWEEP else {}
except ValueError as err:
    raise WorkflowError(f"Invalid config at key 'sweep.grid': {err}") from None
SWEEP_SLUGS = SWEEP.get("prompts") or EVAL_SLUGS
if set(SWEEP_SLUGS) - set(EVAL_SLUGS):
    raise WorkflowError(
        "Invalid config at key 'sweep.prompts': every sweep prompt must be evaluated too "
        f"(evaluation.prompts); not: {sorted(set(SWEEP_SLUGS) - set(EVAL_SLUGS))}"
    )
MODEL_DIRS.update({f"sweep-{name}": f"results/sweep/{name}/model" for name in SWEEP_SETTINGS})

# Stage ii's update rules compared at equal reward queries (optional, config["methods"]; make
# methods): one ddpo_method job per (run, budget), each resuming the same run's previous budget,
# each model evaluated on every evaluation prompt against the stage-i model on the same noise
METHODS = config.get("methods") or {}
try:
    # DDPO trains on all 32 prompts
    METHOD_ARMS = method_arms(METHODS, config["ddpo"], len(PROMPT_SLUGS)) if METHODS else {}
except (ValueError, KeyError) as err:
    raise WorkflowError(f"Invalid config at key 'methods': {err}") from None
METHOD_FINAL = {arm["run"]: name for name, arm in METHOD_ARMS.items() if arm["budget"] == 1.0}
MODEL_DIRS.update(
    {name: f"results/methods/{arm['folder']}/model" for name, arm in METHOD_ARMS.items()}
)
ARM_BY_FOLDER = {arm["folder"]: arm for arm in METHOD_ARMS.values()}  # the {arm} wildcard
METHOD_GRID_PROMPTS = (METHODS.get("grid_prompts") or EVAL_SLUGS[:4]) if METHODS else []
if set(METHOD_GRID_PROMPTS) - set(EVAL_SLUGS):
    raise WorkflowError(
        "Invalid config at key 'methods.grid_prompts': every grid prompt must be evaluated too "
        f"(evaluation.prompts); not: {sorted(set(METHOD_GRID_PROMPTS) - set(EVAL_SLUGS))}"
    )
METRIC_MODELS = [*MODEL_DIRS, *([f"sweep-{BASELINE}"] if SWEEP else [])]


def generate_cfg(wildcards):
    """A generate job's sampling keys: the evaluation's, with fewer samples per prompt for a
    methods model below its full budget (methods.samples_per_prompt)."""
    cfg = {**{k: config["evaluation"][k] for k in GENERATE_KEYS}, **SAMPLE_FORMAT_KEY}
    arm = METHOD_ARMS.get(wildcards.model)
    if arm and arm["budget"] < 1 and METHODS.get("samples_per_prompt"):
        cfg["samples_per_prompt"] = min(cfg["samples_per_prompt"], METHODS["samples_per_prompt"])
    return cfg


def sample_dirs(wildcards, model=None):
    """The generate outputs one model is evaluated on (the wildcard's model unless given)."""
    model = model or wildcards.model
    if model == f"sweep-{BASELINE}":
        return expand("results/samples/sd/{prompt}", prompt=SWEEP_SLUGS)
    prompts = SWEEP_SLUGS if model.startswith("sweep-") else EVAL_SLUGS
    return expand("results/samples/{model}/{prompt}", model=model, prompt=prompts)


def resource(rule_name, key):
    """Resource of a rule from config["resources"], falling back to resources.default."""
    defaults = {"cpus": 1, "mem_mb": 4000, "runtime": 60, "gpus": 0}
    table = config.get("resources", {})
    return table.get(rule_name, {}).get(key, table.get("default", {}).get(key, defaults[key]))


def processes(rule_name):
    """Processes of finetune_sd / ddpo (accelerate launch), from resources.<name>.processes
    or resources.default.processes, else one per GPU of the job, at least 1."""
    table = config.get("resources", {})
    n = table.get(rule_name, {}).get("processes", table.get("default", {}).get("processes"))
    return int(n) if n else max(1, int(resource(rule_name, "gpus")))


def launch_mem_mb(rule_name):
    """Memory of a finetune_sd / ddpo job: mem_mb for its first process plus
    mem_mb_per_process for every further one (each rank holds its own model, optimizer,
    DataLoader workers and CUDA context on the host)."""
    extra = config.get("resources", {}).get(rule_name, {}).get("mem_mb_per_process", 0)
    return int(resource(rule_name, "mem_mb")) + int(extra) * (processes(rule_name) - 1)


def tracking(run_name):
    """Live-curve settings of a training run: its event files go to tracking.dir/<run_name>."""
    return {
        "log_with": config["tracking"]["log_with"],
        "dir": f"{config['tracking']['dir']}/{run_name}",
    }


def all_targets():
    """Final outputs of the workflow. The stage-i prompt-adherence check is a named target
    (results/metrics/stage_i_prompt_adherence.tsv): the evaluation covers its prompts."""
    return [
        MANIFEST,
        TABLE1,
        "results/models/sd",
        expand("results/models/classifier_{role}", role=CLASSIFIERS),
        "results/metrics/autoencoder_check.tsv",
        "results/models/sd_rl",
        "results/evaluation/table2.tsv",
        "results/evaluation/table3.tsv",
        "results/evaluation/table4.tsv",
        "results/figures/samples",
        "results/figures/reward_only_samples.png",
        "results/evaluation/judge_panel.tsv",
        # no DDPO log when SD+RL is the published LoRA merged
        *(["results/figures/ddpo_reward.png"] if RUN_DDPO else []),
        "results/report/summary.html",
        *(["results/sweep/table.tsv"] if SWEEP else []),
        *(["results/methods/table.tsv"] if METHODS else []),
    ]
