"""The hf backend: the plain batched reference (transformers' own generate and a forward pass)."""

from __future__ import annotations


def _prompts(n):
    topics = ["bread", "a long road that goes on", "tides", "why the sky is blue at noon", "cats", "x"]
    return [
        [{"role": "user", "content": f"Tell me about {topics[i % len(topics)]} " * (1 + i % 3)}]
        for i in range(n)
    ]


def test_batched_generation_is_the_one_at_a_time_generation(lively_model):
    """Left padding and length-sorted batches change nothing: a batch of 7 gives each prompt the
    tokens it gets alone (fp32 on a CPU)."""
    from cai.backends.hf import HFBackend

    b = HFBackend(str(lively_model), batch_size=7, device="cpu")
    prompts = _prompts(7)
    together = b.generate(prompts, max_new_tokens=12)
    alone = [b.generate([p], max_new_tokens=12)[0] for p in prompts]
    assert [g.text for g in together] == [g.text for g in alone]
    assert len({g.text for g in together}) > 1  # the model is lively enough to tell rows apart
    assert all(g.n_tokens >= 1 for g in together)


def test_seeded_sampling_reproduces(lively_model):
    from cai.backends.hf import HFBackend

    b = HFBackend(str(lively_model), batch_size=4, device="cpu")
    one = b.generate(_prompts(4), max_new_tokens=10, temperature=1.0, seed=3)
    two = b.generate(_prompts(4), max_new_tokens=10, temperature=1.0, seed=3)
    other = b.generate(_prompts(4), max_new_tokens=10, temperature=1.0, seed=4)
    assert [g.text for g in one] == [g.text for g in two]
    assert [g.text for g in one] != [g.text for g in other]


def test_describe_names_the_engine(lively_model):
    from cai.backends.hf import HFBackend

    d = HFBackend(str(lively_model), device="cpu", threads=1).describe()
    assert d["backend"] == "hf" and d["device"] == "cpu" and d["threads"] == 1
    assert d["engine"].startswith("transformers ")
