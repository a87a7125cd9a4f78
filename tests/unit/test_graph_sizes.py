from workers.cuda_graphs import capture_sizes, prefill_token_sizes


def test_prefill_sizes_cover_every_step_within_the_budget():
    sizes = prefill_token_sizes(16384)
    assert sizes[:13] == [4, 8, 16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024]
    assert 2048 + 256 in sizes and 8192 in sizes and 8192 + 1024 in sizes and sizes[-1] == 16384
    assert prefill_token_sizes(10000)[-2:] == [9216, 10000]
    assert prefill_token_sizes(24) == [4, 8, 16, 24]
    assert prefill_token_sizes(8) == [4, 8]
    assert prefill_token_sizes(3) == [3]
    for budget in (3, 8, 24, 100, 2048, 2049, 5000, 16384, 20000):
        sizes = prefill_token_sizes(budget)
        assert sizes == sorted(set(sizes)) and sizes[-1] == budget
        # a step of a + 1 tokens pads to b: by at most a quarter past 512 tokens, an eighth past 2048
        for a, b in zip(sizes, sizes[1:]):
            assert b - a <= max(128, a // 4 if a < 2048 else a // 8), (a, b)


def test_decode_sizes_reach_max_num_seqs():
    assert capture_sizes(256)[:5] == [1, 2, 4, 8, 16] and capture_sizes(256)[-1] == 256
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
