"""The standard quality figures of an SAE, on the corpus windows held out from training: fraction of variance
explained, L0, dead latents, and the language model's loss with the layer's MLP activations replaced by the SAE's
reconstruction (and by zeros)."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from ..activations import load_windows
from ..adapters import adapter_for
from ..storage import load_tensors, provenance, write_json
from .model import check_fits
from .saelens_io import load_sae
from .streaming import held_out_windows, load_model, stream_settings


def _eval_batches(shard_paths, windows: np.ndarray, batch_size: int, pad_id: int):
    """(input_ids [B, T], valid [B, T]) over the given windows, in window order; valid = real tokens, BOS excluded."""
    rows = []
    for path in shard_paths:
        ids, n_prefix, input_ids = load_windows(path)
        for w, p, seq in zip(ids.tolist(), n_prefix.tolist(), input_ids):
            if w in windows:
                rows.append((w, int(p), seq))
    rows.sort()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(seq) for _, _, seq in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.int64)
        valid = torch.zeros((len(chunk), width), dtype=torch.bool)
        for r, (_, p, seq) in enumerate(chunk):
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
            valid[r, p : len(seq)] = True
        yield ids, valid


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy of predicting token t+1 at every position t where t and t+1 are real tokens."""
    target_ok = valid[:, :-1] & valid[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None].to(logits.device))[..., 0]
    return float(nll[target_ok.to(logits.device)].double().sum()), int(target_ok.sum())


def evaluate_sae(
    model_dir: str | os.PathLike,
    sae_dir: str | os.PathLike,
    shard_paths: list[str | os.PathLike],
    selection_path: str | os.PathLike,
    out_path: str | os.PathLike,
    layer: int,
    name: str,
    eval_tokens: int,
    seed: int,
    compute: dict[str, Any],
    trust_remote_code: bool,
) -> dict[str, Any]:
    """The standard SAE quality figures, on the held-out windows (never trained on):

    - fve: fraction of variance explained, 1 - sum |h - h^|^2 / sum |h - mean h|^2 over the held-out tokens;
    - l0: latents active per token (held-out tokens); l0_corpus and dead_fraction (latents never active) over the
      whole corpus, from the latents' selection statistics;
    - ce_clean, ce_spliced, ce_zero_ablation: the LM's next-token loss (nats per token) as is, with the layer's MLP
      activations replaced by the SAE's reconstruction, and by zeros (at every real token; BOS left alone);
      loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean): 1 is a perfect SAE, 0 no better than zeros.
    """
    stream = stream_settings(0, compute)
    model, tokenizer, info, device = load_model(model_dir, [layer], stream.device, stream.dtype, trust_remote_code, whole=True)
    sae = load_sae(sae_dir, device)
    check_fits(sae, layer, info.n_neurons, f"SAE '{name}'")
    adapter = adapter_for(model)
    out_proj = adapter.out_projection(model, layer)
    windows = set(held_out_windows(shard_paths, eval_tokens, seed).tolist())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batch_size = 16 if stream.batch_size == "auto" else int(stream.batch_size)

    state: dict[str, Any] = {"mode": "clean", "valid": None}
    sums = {"sq_err": 0.0, "sq": 0.0, "n": 0, "active": 0}
    h_sum = torch.zeros(info.n_neurons, dtype=torch.float64)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    ce = {"clean": [0.0, 0], "spliced": [0.0, 0], "zero": [0.0, 0]}

    def hook(_module, args):
        h, valid = args[0], state["valid"].to(args[0].device)
        if state["mode"] == "clean":
            rows = h[valid].float()
            f = sae.encode(rows)
            recon = sae.decode(f)
            sums["sq_err"] += float((rows - recon).double().pow(2).sum())
            sums["sq"] += float(rows.double().pow(2).sum())
            sums["n"] += rows.shape[0]
            sums["active"] += int((f > 0).sum())
            h_sum.add_(rows.double().sum(0).cpu())
            fired.logical_or_((f > 0).any(0).cpu())
            return None
        replaced = h.clone()
        replaced[valid] = sae.reconstruct(h[valid]) if state["mode"] == "spliced" else 0.0
        return (replaced, *args[1:])

    handle = out_proj.register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            for ids, valid in _eval_batches(shard_paths, windows, batch_size, pad_id):
                state["valid"] = valid
                for mode in ("clean", "spliced", "zero"):
                    state["mode"] = mode
                    logits = model(input_ids=ids.to(device), use_cache=False).logits
                    total, count = _next_token_loss(logits, ids, valid)
                    ce[mode][0] += total
                    ce[mode][1] += count
    finally:
        handle.remove()
    n = max(sums["n"], 1)
    variance = sums["sq"] - float(h_sum.pow(2).sum()) / n
    stats, _ = load_tensors(selection_path)
    n_tokens = max(int(stats["n_tokens"][0]), 1)
    clean, spliced, zero = (ce[m][0] / max(ce[m][1], 1) for m in ("clean", "spliced", "zero"))
    result = {
        "sae": name,
        "layer": layer,
        "architecture": sae.architecture,
        "k": sae.k,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "expansion": sae.d_sae / sae.d_in,
        "eval_tokens": sums["n"],
        "eval_windows": len(windows),
        "fve": 1.0 - sums["sq_err"] / max(variance, 1e-12),
        "l0": sums["active"] / n,
        "dead_fraction_eval": float(1.0 - fired.float().mean()),
        "corpus_tokens": n_tokens,
        "l0_corpus": float(stats["stat_positive"].sum() / n_tokens),
        "dead_fraction": float((stats["stat_positive"] == 0).mean()),
        "ce_clean": clean,
        "ce_spliced": spliced,
        "ce_zero_ablation": zero,
        "ce_increase": spliced - clean,
        "loss_recovered": (zero - spliced) / (zero - clean) if zero != clean else None,
        "ce_tokens": ce["clean"][1],
    }
    meta = provenance("sae_quality", {"eval_tokens": eval_tokens, "seed": seed}, model=asdict(info), compute=compute)
    write_json({**result, "provenance": meta}, out_path)
    return {k: result[k] for k in ("fve", "l0", "dead_fraction", "loss_recovered")}
