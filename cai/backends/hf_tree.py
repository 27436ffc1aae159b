"""The judge's prefix tree on transformers: option log-probs with each shared span computed once.

The judge sends each pair in both orders and under several principles, and those prompts
repeat the same long conversation. ``tree_logprobs`` merges a call's prompts into a radix tree
of their token ids and runs it level by level, so every shared span (the system prompt and
instructions for all pairs, the conversation for one pair) goes through the model once and its
KV cache is copied to the branches that continue it; ``flat_logprobs`` is the plain path it is
checked against (``check_prefix_path``, once per backend). The functions take the HFBackend
``b`` (its model, tokenizer, device, batch size and stats).
"""

from __future__ import annotations

import copy
import sys

from cai.errors import InputError


def flat_logprobs(b, ids, opt):
    """Each prompt in full, in length-sorted left-padded batches."""
    torch = b._torch
    opt = torch.tensor(opt, device=b.device)
    out: list[list[float] | None] = [None] * len(ids)
    for idx, enc in b._batches(ids=ids):
        with torch.inference_mode():
            # logits_to_keep=1: only the last position's logits (saves a vocab-sized matmul per token)
            logits = b.model(**enc, logits_to_keep=1).logits[:, -1, :].float()
        lp = torch.log_softmax(logits, dim=-1)[:, opt]
        for j, i in enumerate(idx):
            out[i] = lp[j].tolist()
    return out


def tree_logprobs(b, ids, opt):
    """The same numbers as _flat_logprobs, computing each shared prefix once.

    The prompts form a radix tree of token ids. The trunk every prompt shares is run once
    (batch 1); the subtrees under it (for the judge: one pair's conversation, then its
    orders and principles) are packed into batches of at most batch_size prompts and run
    one tree level per forward pass, each node continuing its parent's KV cache. A node's
    tokens are left-padded within its level, so padding sits *between* levels; the
    attention mask hides it and explicit position ids keep each row's positions contiguous.
    """
    root = _radix_tree(ids)
    out: list[list[float] | None] = [None] * len(ids)

    def record(nodes, lp):
        for j, node in enumerate(nodes):
            for i in node.ends:
                out[i] = lp[j].tolist()

    if len(root.kids) == 1 and not root.ends:
        trunk = next(iter(root.kids.values()))
        _unshare_short(trunk)
        trunk_state, lp = _extend(b, None, [trunk], None, opt)
        record([trunk], lp)
        units = list(trunk.kids.values())
    else:
        _unshare_short(root)
        trunk_state, units = None, list(root.kids.values())
    b.stats["prefix_tokens_reused"] += sum(len(r) for r in ids) - _tree_tokens(root)
    for batch in _pack(b, units):
        nodes, parents, state = batch, [0] * len(batch) if trunk_state else None, None
        while nodes:
            base = copy.deepcopy(trunk_state) if state is None and trunk_state else state
            state, lp = _extend(b, base, nodes, parents, opt)
            record(nodes, lp)
            parents = [j for j, n in enumerate(nodes) for _ in n.kids]
            nodes = [k for n in nodes for k in n.kids.values()]
    return out


def _pack(b, units):
    """Batches of subtrees: at most batch_size prompts each, and a subtree joins a batch only
    while the padding it causes stays within a budget of the batch's real tokens (10% on a
    CPU, 100% on a GPU). On a CPU a bigger batch buys almost nothing — with ~100 tokens per
    row the matmuls are already large — so padding is pure loss; a GPU trades some padding
    for parallelism."""
    budget = 0.1 if b.device == "cpu" else 1.0
    units = sorted(units, key=_longest)
    batch, widths, real, leaves = [], [], 0, 0
    for u in units:
        prof, u_real, u_leaves = _profile(u), _tree_tokens(u), _leaves(u)
        merged = [(max(a[0], b[0]), a[1] + b[1]) for a, b in _zip_longest(widths, prof)]
        cost = sum(w * n for w, n in merged)
        if batch and (leaves + u_leaves > b.batch_size or cost > (1 + budget) * (real + u_real)):
            yield batch
            batch, widths, real, leaves = [], [], 0, 0
            merged = prof
        batch.append(u)
        widths, real, leaves = merged, real + u_real, leaves + u_leaves
    if batch:
        yield batch


def _extend(b, state, nodes, parents, opt):
    """Run each node's tokens after its parent's row of ``state``; return the new state and
    the option log-probs after each node's last token."""
    torch = b._torch
    width = max(len(n.toks) for n in nodes)
    ids = torch.full((len(nodes), width), b.tok.pad_token_id, dtype=torch.long)
    new_mask = torch.zeros((len(nodes), width), dtype=torch.long)
    for j, n in enumerate(nodes):
        ids[j, width - len(n.toks) :] = torch.tensor(n.toks)
        new_mask[j, width - len(n.toks) :] = 1
    ids, new_mask = ids.to(b.device), new_mask.to(b.device)
    b.stats["computed_tokens"] += ids.numel()  # padding included: the work actually done
    if state is None:
        cache, mask, lens = None, new_mask, new_mask.sum(1)
        pos = (new_mask.cumsum(1) - 1).clamp(min=0)
    else:
        cache, past_mask, past_lens = state
        sel = torch.tensor(parents, device=b.device)
        cache.batch_select_indices(sel)
        past_mask, past_lens = past_mask[sel], past_lens[sel]
        mask = torch.cat([past_mask, new_mask], dim=1)
        pos = past_lens[:, None] + (new_mask.cumsum(1) - 1).clamp(min=0)
        lens = past_lens + new_mask.sum(1)
    with torch.inference_mode():
        res, new_cache = b._forward(ids, mask, pos, cache)
    lp = torch.log_softmax(res.logits[:, -1, :].float(), dim=-1)[:, torch.tensor(opt, device=b.device)]
    return (new_cache, mask, lens), lp


def check_prefix_path(b, ids, opt) -> bool:
    """Once per backend: the prefix tree and plain batches must give the same numbers on two
    of this call's prompts (cheap insurance for architectures with unusual caches). Each is
    cut 16 tokens past where the two part, so the check runs a shared trunk and two branches
    as the real calls do, without paying for two whole judge prompts twice."""
    p, q = ids[0], ids[1]
    k = next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), min(len(p), len(q)))
    sample = [p[: k + 16], q[: k + 16]]
    try:
        tree = tree_logprobs(b, sample, opt)
        flat = flat_logprobs(b, sample, opt)
    except Exception as e:  # noqa: BLE001 - any failure means: use the plain path
        _warn(
            f"shared-prefix scoring unavailable for this model ({type(e).__name__}: {e}); using plain batches"
        )
        return False
    tol = 1e-3 if b.dtype == b._torch.float32 else 0.1
    diff = max(abs(x - y) for ra, rb in zip(tree, flat) for x, y in zip(ra, rb))
    if diff > tol:
        _warn(
            f"shared-prefix scoring differs from plain batches by {diff:.3g} on this model; using plain "
            "batches"
        )
        return False
    return True


class _Node:
    __slots__ = ("toks", "kids", "ends")

    def __init__(self, toks):
        self.toks = toks  # the tokens on the edge into this node (never empty below the root)
        self.kids: dict[int, _Node] = {}  # first token -> child
        self.ends: list[int] = []  # prompts that end exactly here


def _radix_tree(seqs: list[list[int]]) -> _Node:
    root = _Node([])
    for i, s in enumerate(seqs):
        node, pos = root, 0
        while True:
            if pos == len(s):
                node.ends.append(i)
                break
            child = node.kids.get(s[pos])
            if child is None:
                leaf = _Node(list(s[pos:]))
                leaf.ends.append(i)
                node.kids[s[pos]] = leaf
                break
            t, k, m = child.toks, 0, min(len(child.toks), len(s) - pos)
            while k < m and t[k] == s[pos + k]:
                k += 1
            if k < len(t):  # split the edge where this prompt leaves it
                mid = _Node(t[:k])
                child.toks = t[k:]
                mid.kids[child.toks[0]] = child
                node.kids[s[pos]] = mid
                child = mid
            node, pos = child, pos + k
    if root.ends:
        raise InputError("an empty prompt cannot be scored")
    return root


# A span shorter than this is not worth sharing: it would tie unrelated prompts (all those that
# start with "How do I") into one batch whose deeper levels pad each other's lengths.
MIN_SHARED_TOKENS = 32


def _unshare_short(node):
    """Push short shared spans below ``node`` down into their children, recursively."""
    kids, out = list(node.kids.values()), []
    while kids:
        k = kids.pop()
        if k.kids and not k.ends and len(k.toks) < MIN_SHARED_TOKENS:
            for g in k.kids.values():
                g.toks = k.toks + g.toks
                kids.append(g)
        else:
            out.append(k)
    # keys no longer matter once the tree is built (merged children may share a first token)
    node.kids = {i: k for i, k in enumerate(reversed(out))}
    for k in out:
        _unshare_short(k)


def _walk(node):
    yield node
    for k in node.kids.values():
        yield from _walk(k)


def _tree_tokens(root) -> int:
    return sum(len(n.toks) for n in _walk(root))


def _leaves(node) -> int:
    return sum(len(n.ends) for n in _walk(node))


def _profile(node) -> list[tuple[int, int]]:
    """(widest edge, node count) per tree level: the shape of the forward passes it needs."""
    out, frontier = [], [node]
    while frontier:
        out.append((max(len(n.toks) for n in frontier), len(frontier)))
        frontier = [k for n in frontier for k in n.kids.values()]
    return out


def _zip_longest(a, b):
    for i in range(max(len(a), len(b))):
        yield (a[i] if i < len(a) else (0, 0)), (b[i] if i < len(b) else (0, 0))


def _longest(node) -> int:
    return len(node.toks) + max((_longest(k) for k in node.kids.values()), default=0)


def _warn(msg: str):
    print(f"cai: {msg}", file=sys.stderr)
