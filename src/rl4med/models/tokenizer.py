"""A word-level tokenizer for the prompt vocabulary, trained offline for the tiny Stable Diffusion.

SD v1.5 ships CLIP's BPE tokenizer; the tiny model needs one without a download. It is trained
with ``tokenizers`` on the 32 prompts in both templates (``paper`` and ``authors``) and wrapped
as a transformers fast tokenizer, so both load with ``AutoTokenizer.from_pretrained(folder)``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from rl4med.prompts import TEMPLATES, all_prompts

SPECIAL = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}


def train_prompt_tokenizer(max_length: int = 20) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the words of both prompt templates.

    ``max_length`` must hold the longest prompt of either template (20 tokens with <bos> and
    <eos>, the authors' wording): a truncated prompt would silently drop its last artifact.
    """
    texts = [p.render(t).lower() for p in all_prompts() for t in TEMPLATES]
    tok = Tokenizer(models.WordLevel(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL.values()), min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos = SPECIAL["bos"], SPECIAL["eos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))],
    )
    tok.normalizer = normalizers.Lowercase()
    longest = max(len(tok.encode(t).ids) for t in texts)
    if longest > max_length:
        raise ValueError(
            f"sd.tiny.max_prompt_tokens={max_length} is too short: the longest prompt has "
            f"{longest} tokens"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        model_max_length=max_length,
    )
