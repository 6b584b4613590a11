"""Training helpers shared by every route: one supervised fine-tuning helper (`stillroom.train.sft`)."""

from stillroom.train.sft import SFTResult, SFTSettings, heal, load_records, train_sft

__all__ = ["SFTResult", "SFTSettings", "heal", "load_records", "train_sft"]
