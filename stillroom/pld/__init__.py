"""Prompt-Level Distillation: the teacher's reasoning as an auditable rulebook in the student's system prompt."""
