"""Single-process references for the Trainer scripts: plain Hugging Face models (SDPA), full sequences,
the model's own loss (which shifts causal-LM labels itself), DDP's data-parallel mean by hand."""

from __future__ import annotations

import torch
from tiny_lm import build_model, make_samples
from torch.utils.data import DataLoader, DistributedSampler


def dp_batches(samples: list, dp_size: int, batch_size: int, epoch: int = 0) -> list[list[dict]]:
    """batches[step][dp_rank]: what each data-parallel rank loads in ``epoch`` (Lightning's training sampler:
    a DistributedSampler over the data-parallel ranks, shuffled with seed 0 and ``set_epoch``)."""
    per_rank = []
    for rank in range(dp_size):
        sampler = DistributedSampler(samples, dp_size, rank, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        per_rank.append(list(DataLoader(samples, batch_size=batch_size, sampler=sampler)))
    return [list(step) for step in zip(*per_rank)]


def reference_run(kind: str, train_samples: int, dp_size: int, batch_size: int, epochs: int, lr: float = 0.5) -> dict:
    """Losses per step, gradients after the first backward and final parameters of plain SGD training."""
    model = build_model(kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    samples = make_samples(kind, train_samples)
    losses, first_grads = [], None
    for epoch in range(epochs):
        for step in dp_batches(samples, dp_size, batch_size, epoch):
            optimizer.zero_grad()
            loss = torch.stack([model(**batch).loss for batch in step]).mean()  # DDP: mean over data-parallel ranks
            loss.backward()
            if first_grads is None:
                first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            optimizer.step()
            losses.append(loss.item())
    return {"model": model, "losses": losses, "first_grads": first_grads,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}
