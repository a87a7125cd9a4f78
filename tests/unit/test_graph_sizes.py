from workers.cuda_graphs import capture_sizes, prefill_token_sizes


def test_prefill_sizes_cover_every_step_within_the_budget():
    assert prefill_token_sizes(16384) == [16, 32, 64, 128, 256, 512, 1024, 2048] + list(range(4096, 16385, 2048))
    assert prefill_token_sizes(10000)[-3:] == [6144, 8192, 10000]
    assert prefill_token_sizes(2048) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert prefill_token_sizes(24) == [16, 24]
    assert prefill_token_sizes(8) == [8]
    for budget in (8, 24, 100, 2048, 2049, 5000, 16384, 20000):
        sizes = prefill_token_sizes(budget)
        assert sizes == sorted(set(sizes)) and sizes[-1] == budget
        # a step of a + 1 tokens pads to b: never by 2048 tokens or more
        assert all(b - a <= 2048 for a, b in zip([0] + sizes, sizes))


def test_decode_sizes_reach_max_num_seqs():
    assert capture_sizes(256)[:5] == [1, 2, 4, 8, 16] and capture_sizes(256)[-1] == 256
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
