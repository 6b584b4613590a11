"""Adversarial distillation: GAD, Generative Adversarial Distillation (black-box on-policy distillation,
arXiv 2511.10643).

The student is the generator; the discriminator is a copy of the student with a scalar head that scores a
response at its last token and is trained with the Bradley-Terry loss −log σ(D(teacher) − D(student)). After a
warm-up (discriminator-only steps, then SeqKD on the teacher's answers with the discriminator trained alongside),
each adversarial step samples G responses per prompt, rewards them with the discriminator's score, and updates
the student with TRL's GRPOTrainer (group-normalised advantages, clipped policy gradient, KL β to the warmed-up
student) while the discriminator keeps training on the same samples. Only the teacher's text is needed, through
the run's durable cache (`stillroom.backends.open_cached_backend`), so API teachers work and reruns repay
nothing. Adversarial training is unstable; a frozen discriminator gets reward-hacked (e.g. long answers).

    config.py         `GADConfig` (every setting, validated)
    discriminator.py  `bt_loss`, `Discriminator` (scalar-head copy of the student: build, score, update step),
                      `sample_completions`
    train.py          `warm_up`, `GADReward` (TRL reward callable), `adversarial` (TRL GRPOTrainer), `run_gad`
    cli.py            registers `stillroom gad`
Modules import torch; this package file does not.
"""

_LAZY = {
    "GADConfig": "config", "Discriminator": "discriminator", "bt_loss": "discriminator",
    "sample_completions": "discriminator", "run_gad": "train", "GADReward": "train", "warm_up": "train",
    "adversarial": "train",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"stillroom.gad.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'stillroom.gad' has no attribute {name!r}")
