"""Evaluation: feature extraction (Inception, CLIP) then pure maths (FID, KID, CLIP score), reports and prompt sets."""
