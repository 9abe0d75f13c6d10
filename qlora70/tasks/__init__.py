"""Evaluation tasks: MedQA-USMLE, PubMedQA, USMLE self-assessment, generic multiple-choice JSONL."""
