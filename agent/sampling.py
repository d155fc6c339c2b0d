"""Drawing one token id per row from probability rows, by inverse CDF at given uniforms:
the in-process policy's sampler (each row has its own seeded uniform per step, so a row's
draw does not depend on its batch neighbours)."""

from __future__ import annotations

import torch


def draw(probs_S_V: torch.Tensor, u_S: torch.Tensor) -> torch.Tensor:
    """One id per row from `probs_S_V`, by inverse CDF at the uniforms `u_S`."""
    cum_S_V = probs_S_V.cumsum(dim=-1)
    total_S = cum_S_V[:, -1]
    # x < total even when u * total rounds up, and right=True finds the first id whose CDF
    # step passes x: a step of height zero (an id of probability zero) is never picked.
    x_S = torch.minimum(u_S * total_S, torch.nextafter(total_S, torch.zeros_like(total_S)))
    return torch.searchsorted(cum_S_V, x_S[:, None], right=True)[:, 0]


def draw_nucleus(probs_S_V: torch.Tensor, top_p_S: torch.Tensor, u_S: torch.Tensor) -> torch.Tensor:
    """Like `draw`, restricted to each row's top-p nucleus (arXiv:1904.09751): the most
    likely ids, in order, while the mass before them is below top_p.

    The nucleus is searched among the top 64 ids first, then 1,024, then the whole vocabulary,
    as a full sort of the vocabulary costs far more than a small `topk`.
    """
    vocab = probs_S_V.shape[-1]
    picked_S = torch.empty(len(u_S), dtype=torch.long, device=u_S.device)
    todo_R = torch.arange(len(u_S), device=u_S.device)
    for k in (min(64, vocab), min(1024, vocab), vocab):
        probs_R_K, order_R_K = probs_S_V[todo_R].topk(k, dim=-1)
        cum_R_K = probs_R_K.cumsum(dim=-1)
        top_p_R = top_p_S[todo_R]
        covered_R = cum_R_K[:, -1] >= top_p_R if k < vocab else torch.ones_like(top_p_R).bool()
        kept_R_K = probs_R_K * ((cum_R_K - probs_R_K) < top_p_R[:, None])
        ids_R = order_R_K.gather(1, draw(kept_R_K, u_S[todo_R])[:, None])[:, 0]
        picked_S[todo_R[covered_R]] = ids_R[covered_R]
        todo_R = todo_R[~covered_R]
        if len(todo_R) == 0:
            break
    return picked_S
