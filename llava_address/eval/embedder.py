"""AddressCLIP's text tower as an embedding function for the scorer (`address-llava score --embed-clip`):
answers naming no street the gazetteer knows are matched to the nearest address in its text-embedding space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np


def clip_text_embedder(path: str | Path, device: str = "cpu") -> Callable[[list[str]], np.ndarray]:
    """`embed(texts)` (L2-normalised rows) from AddressCLIP's text tower, for --embed-clip.

    path: a train-clip checkpoint (open_clip; a run folder with final/ or checkpoints/ works too), or an
    export-clip folder (its clip_model/ CLIPModel + tokenizer, transformers).
    """
    import torch

    p = Path(path)
    if (p / "clip_model" / "config.json").is_file():
        p = p / "clip_model"
    if (p / "config.json").is_file():
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(p).to(device).eval()
        tok = AutoTokenizer.from_pretrained(p)

        @torch.no_grad()
        def embed(texts: list[str]) -> np.ndarray:
            out = []
            for i in range(0, len(texts), 256):
                batch = tok(texts[i:i + 256], padding="max_length", truncation=True,
                            max_length=model.config.text_config.max_position_embeddings, return_tensors="pt").to(device)
                feats = model.get_text_features(**batch)
                feats = getattr(feats, "pooler_output", feats)
                out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
            return np.concatenate(out) if out else np.zeros((0, model.config.projection_dim))

        return embed
    # lazy, like torch above: scoring without --embed-clip imports neither
    from clip_stage.gallery import encode_texts
    from clip_stage.model import load_checkpoint

    bundle = load_checkpoint(p, device=device)  # CheckpointError names what is missing
    return lambda texts: encode_texts(bundle.model, bundle.tokenizer, list(texts), device=device).numpy()
