"""Zero-shot accuracy through lm-evaluation-harness (``pip install masa[eval]``), passing the loaded model.

:class:`MasaHarnessLM` is an ``lm_eval`` ``LM`` over any causal model masa loads (Hugging Face or
native, compressed or not) and either tokenizer kind masa uses (``tokenizers`` or transformers): the
model object is handed over as it is; nothing is reloaded by name and no remote code runs. Standard
tasks (ARC, HellaSwag, PIQA, WinoGrande) download their data through ``datasets`` and so need network
access; offline, a task must read local files: :func:`write_cloze_task` builds one in lm-eval's own
task format from a local text (``--local-cloze FILE``), and ``--include DIR`` adds any task YAMLs.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from masa.data.tokenizer import decode, encode, eot_id

MISSING = "lm-eval is not installed: pip install 'masa[eval]' (or pip install lm-eval)"
CLOZE_TASK = "masa_cloze"


def _harness():
    try:
        import lm_eval
        from lm_eval.api.model import LM
    except ImportError as err:
        raise ImportError(MISSING) from err
    return lm_eval, LM


def harness_lm(model: nn.Module, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """An lm-eval ``LM`` scoring with ``model`` (eval mode, its device) and ``tokenizer``."""
    _, LM = _harness()

    class MasaHarnessLM(LM):
        """Log-likelihoods from the model's logits; greedy generation for ``generate_until`` tasks."""

        def __init__(self):
            super().__init__()
            self.model, self.tokenizer, self.batch = model.eval(), tokenizer, batch_size
            config = getattr(model, "config", None)
            self.max_length = max_length or getattr(config, "max_position_embeddings", None) or 2048
            self.torch_device = next(model.parameters()).device

        def _logprobs(self, ids: list[int]) -> torch.Tensor:
            """Log-probabilities (len(ids) - 1, V) of each next token given the ones before (last window)."""
            ids = ids[-(self.max_length + 1) :]
            with torch.no_grad():
                logits = self.model(torch.tensor([ids[:-1]], device=self.torch_device)).logits[0]  # (T, V)
            return F.log_softmax(logits.float(), dim=-1)

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            out = []
            for request in requests:
                context, continuation = request.args
                head = encode(self.tokenizer, context) if context else [eot_id(self.tokenizer) or 0]
                tail = encode(self.tokenizer, continuation)
                logp = self._logprobs(head + tail)[-len(tail) :]  # (C, V)
                target = torch.tensor(tail, device=logp.device)
                picked = logp.gather(-1, target[:, None])[:, 0]
                out.append((float(picked.sum()), bool((logp.argmax(-1) == target).all())))
            return out

        def loglikelihood_rolling(self, requests) -> list[float]:
            out = []
            for request in requests:
                ids = [eot_id(self.tokenizer) or 0, *encode(self.tokenizer, request.args[0])]
                total = 0.0
                for start in range(0, len(ids) - 1, self.max_length):  # disjoint windows of scored tokens
                    window = ids[start : start + self.max_length + 1]
                    logp = self._logprobs(window)
                    total += float(
                        logp.gather(-1, torch.tensor(window[1:], device=logp.device)[:, None]).sum()
                    )
                out.append(total)
            return out

        def generate_until(self, requests) -> list[str]:
            out = []
            for request in requests:
                context, kwargs = request.args
                until = kwargs.get("until") or []
                ids = encode(self.tokenizer, context)
                new: list[int] = []
                for _ in range(int(kwargs.get("max_gen_toks", 64))):
                    logp = self._logprobs([*ids, *new, 0])  # the dummy last token is not scored
                    new.append(int(logp[-1].argmax()))
                    text = decode(self.tokenizer, new)
                    if new[-1] == eot_id(self.tokenizer) or any(u in text for u in until):
                        break
                text = decode(self.tokenizer, new)
                for stop in until:
                    text = text.split(stop)[0]
                out.append(text)
            return out

    return MasaHarnessLM()


def write_cloze_task(text: str, directory: str | os.PathLike, n: int = 200, seed: int = 0) -> str:
    """A four-way cloze task in lm-eval's format from ``text``: each item is a sentence's start and its
    last word, against the last words of three other sentences. Writes ``DIR/masa_cloze.{jsonl,yaml}``;
    returns the task name (``masa_cloze``)."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    sentences = [s.split() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))]
    sentences = [s for s in sentences if 8 <= len(s) <= 40]
    words = sorted({re.sub(r"\W+$", "", s[-1]) for s in sentences} - {""})
    if len(sentences) < 10 or len(words) < 4:
        raise ValueError("the text has too few sentences of 8-40 words for a cloze task: give a longer text")
    rng = random.Random(seed)
    rows = []
    for s in sentences[:n]:
        answer = re.sub(r"\W+$", "", s[-1])
        choices = [answer, *rng.sample([w for w in words if w != answer], 3)]
        rng.shuffle(choices)
        rows.append(
            {
                "context": " ".join(s[:-1]),
                "choices": [f" {c}" for c in choices],
                "label": choices.index(answer),
            }
        )
    data = directory / f"{CLOZE_TASK}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (directory / f"{CLOZE_TASK}.yaml").write_text(
        f"task: {CLOZE_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n',
        encoding="utf-8",
    )
    return CLOZE_TASK


def evaluate(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    include: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict]:
    """Run lm-eval ``tasks`` on ``model``; returns task -> metrics. Unknown tasks raise lm-eval's message."""
    lm_eval, _ = _harness()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include) if include else None)
    results = lm_eval.simple_evaluate(
        model=harness_lm(model, tokenizer, batch_size), tasks=tasks, task_manager=manager, limit=limit
    )
    return {task: dict(metrics) for task, metrics in results["results"].items()}
