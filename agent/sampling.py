"""Drawing one token id per row from probability rows, by inverse CDF at given uniforms:
the in-process policy's sampler (each row has its own seeded uniform per step, so a row's
draw does not depend on its batch neighbours)."""

from __future__ import annotations

from collections.abc import Sequence

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


def sample_rows(
    logits_B_V: torch.Tensor,
    temperatures: Sequence[float],
    top_ps: Sequence[float],
    uniforms: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One id per row and its logprob, log_softmax(logits / temperature) before top-p
    truncation (`turnrl.agent.policy`). A row at temperature 0 takes the argmax, scored under
    the raw logits; the others draw by inverse CDF (`draw`, or `draw_nucleus` when their
    top_p < 1) with their own uniform from `uniforms`, one per such row in order: a row's
    draw does not depend on its neighbours, and costs one cumsum rather than a vocabulary's
    worth of random numbers."""
    logits_B_V = logits_B_V.float()
    device = logits_B_V.device
    tokens_B = logits_B_V.argmax(dim=-1)
    if all(t == 0 for t in temperatures):
        logp_B_V = torch.log_softmax(logits_B_V, dim=-1)
    else:
        scale_B = torch.tensor([t if t > 0 else 1.0 for t in temperatures], device=device)
        logp_B_V = torch.log_softmax(logits_B_V / scale_B[:, None], dim=-1)
        drawn = [i for i, t in enumerate(temperatures) if t > 0]
        u_S = torch.tensor(list(uniforms), device=device)
        probs_S_V = (logp_B_V if len(drawn) == len(temperatures) else logp_B_V[drawn]).exp()
        top_p = [top_ps[i] for i in drawn]
        whole = [j for j, p in enumerate(top_p) if p >= 1]
        nucleus = [j for j, p in enumerate(top_p) if p < 1]
        picked_S = torch.empty(len(drawn), dtype=torch.long, device=device)
        if whole:
            picked_S[whole] = draw(probs_S_V[whole], u_S[whole])
        if nucleus:
            picked_S[nucleus] = draw_nucleus(
                probs_S_V[nucleus],
                torch.tensor([top_p[j] for j in nucleus], device=device),
                u_S[nucleus],
            )
        tokens_B[drawn] = picked_S
    return tokens_B, logp_B_V.gather(1, tokens_B[:, None])[:, 0]
