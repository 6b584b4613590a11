"""GAD's discriminator: a copy of the student with a scalar head, trained with the Bradley-Terry loss.

The discriminator `D` reads a prompt and a response and returns one number, taken at the response's last token:
transformers' `AutoModelForSequenceClassification` with `num_labels=1` does exactly that (its
`GenericForSequenceClassification` pools the logit of the rightmost token that is not `config.pad_token_id`),
so the only head here is that library's `score` layer. It starts from the student's backbone weights (the paper
initialises the discriminator from the student), with a fresh head.

Training signal (Bradley-Terry, as for reward models): for a prompt x, the teacher's answer y_t and a student
sample y_s, loss = −log σ(D(x, y_t) − D(x, y_s)). The student (generator) is then rewarded with D(x, y_s).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def bt_loss(r_teacher: torch.Tensor, r_student: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss of a discriminator that should prefer the teacher: mean of −log σ(r_t − r_s)."""
    return -F.logsigmoid(r_teacher - r_student).mean()


def _plain(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (the student itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Discriminator:
    """A scalar-head copy of the student that scores (prompt, response) pairs, and its own AdamW optimiser.

    `step(prompts, teacher, student)` is one Bradley-Terry update on aligned lists (the i-th teacher answer and
    the i-th student sample answer the i-th prompt); `score(prompts, responses)` is the reward the student gets.
    """

    def __init__(self, model: Any, tokenizer: Any, *, learning_rate: float = 1e-5, max_length: int = 512,
                 micro_batch: int = 16, max_grad_norm: float = 1.0):
        if model.config.get_text_config().pad_token_id is None:
            raise ValueError("the discriminator needs config.pad_token_id to find each response's last token")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.micro_batch = max(1, micro_batch)
        self.max_grad_norm = max_grad_norm
        self.learning_rate = learning_rate
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
        self.steps = 0

    # -------------------------------------------------------------------------------------------- building

    @classmethod
    def from_student(cls, student: Any, tokenizer: Any, **kwargs) -> Discriminator:
        """A discriminator whose backbone is a copy of the student's weights (fresh scalar head)."""
        from transformers import AutoModelForSequenceClassification

        base = _plain(student)
        config = copy.deepcopy(base.config)
        config.num_labels = 1
        config.problem_type = "regression"
        config.pad_token_id = tokenizer.pad_token_id
        if hasattr(config, "get_text_config"):
            config.get_text_config().pad_token_id = tokenizer.pad_token_id
        dtype = next(base.parameters()).dtype
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        # Both classes keep their backbone under `base_model_prefix` ("model"): copy it, keep the new head.
        model.base_model.load_state_dict(base.base_model.state_dict())
        model.to(next(base.parameters()).device)
        return cls(model, tokenizer, **kwargs)

    @classmethod
    def load(cls, path: str | Path, tokenizer: Any, *, device: Any = None, dtype: Any = None, **kwargs) -> Discriminator:
        """A discriminator saved by `save` (the optimiser state starts afresh)."""
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(path), **({"dtype": dtype} if dtype else {}))
        if device is not None:
            model.to(device)
        return cls(model, tokenizer, **kwargs)

    def save(self, path: str | Path) -> Path:
        """Save as a plain transformers folder (atomically, like every model in a run folder)."""
        from stillroom.backends.embedded import save_model_folder

        return save_model_folder(self.model, self.tokenizer, Path(path))

    # -------------------------------------------------------------------------------------------- scoring

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _encode(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        # Keep the end of each text (the response) when it is too long: the score is read at the last token.
        ids = [x[-self.max_length:] for x in self.tokenizer([p + r for p, r in zip(prompts, responses, strict=True)])["input_ids"]]
        batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt", padding_side="right")
        return {k: v.to(self.device) for k, v in batch.items()}

    def _forward(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return self.model(**self._encode(prompts, responses)).logits[:, 0].float()

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """D(prompt, response) for each pair, shape [N] (float32, on the CPU)."""
        was_training = self.model.training
        self.model.eval()
        out = [self._forward(prompts[i:i + self.micro_batch], responses[i:i + self.micro_batch]).cpu()
               for i in range(0, len(prompts), self.micro_batch)]
        self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def accuracy(self, prompts: Sequence[str], teacher: Sequence[str], student: Sequence[str]) -> float:
        """Share of pairs where the teacher's answer scores strictly above the student's."""
        return float((self.score(prompts, teacher) > self.score(prompts, student)).float().mean())

    # -------------------------------------------------------------------------------------------- training

    def step(self, prompts: Sequence[str], teacher: Sequence[str], student: Sequence[str]) -> dict[str, float]:
        """One optimiser step on the Bradley-Terry loss over all pairs (micro-batched, gradients accumulated).

        Returns the loss, the accuracy (r_t > r_s) and mean scores, all measured before the update.
        """
        n = len(prompts)
        if not (n == len(teacher) == len(student)) or n == 0:
            raise ValueError("step needs equally long, non-empty lists of prompts, teacher and student answers")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = correct = 0.0
        r_t_sum = r_s_sum = 0.0
        with torch.enable_grad():  # the caller may be inside a no-grad block (e.g. a trainer's reward step)
            for i in range(0, n, self.micro_batch):
                sl = slice(i, i + self.micro_batch)
                m = len(prompts[sl])
                r = self._forward(list(prompts[sl]) * 2, list(teacher[sl]) + list(student[sl]))
                r_t, r_s = r[:m], r[m:]
                loss = bt_loss(r_t, r_s) * (m / n)
                loss.backward()
                total += float(loss.detach())
                correct += float((r_t > r_s).sum())
                r_t_sum += float(r_t.detach().sum())
                r_s_sum += float(r_s.detach().sum())
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return {"loss": total, "accuracy": correct / n, "r_teacher": r_t_sum / n, "r_student": r_s_sum / n}


@torch.no_grad()
def sample_completions(model: Any, tokenizer: Any, prompts: Sequence[str], *, temperature: float = 0.8,
                       max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """One sampled completion per prompt from the student (decoded without special tokens, as TRL's GRPOTrainer
    decodes its samples, so the discriminator sees the same kind of text in both stages)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True, padding_side="left").to(device)
        gen = model.generate(**enc, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                             top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return out
