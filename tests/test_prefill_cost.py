"""The prefill cost model: which cold experts to stream to the GPU while the CPU computes the rest."""

from dsrun.offload.prefill import StreamCost

EXPERT = 25_000_000  # bytes of a DeepSeek-V3 Q4_K expert
FLOPS_PER_ROW = 2 * 3 * 7168 * 2048


def test_decode_stays_on_the_cpu_and_prefill_splits():
    cost = StreamCost(cpu_bytes_per_s=40e9, cpu_flops_per_s=0.4e12, stream_bytes_per_s=25e9)
    # decode: a few tokens never stream, whatever the numbers say
    assert cost.stream_count(1, [1] * 8, EXPERT, FLOPS_PER_ROW) == 0
    assert StreamCost(stream_bytes_per_s=1e30).stream_count(4, [4] * 8, EXPERT, FLOPS_PER_ROW) == 0
    # prefill: 256 cold experts, 8 rows each. All on the CPU is compute-bound (0.45 s), all streamed
    # 0.26 s; split, both sides end together near 0.16 s
    k = cost.stream_count(256, [8] * 256, EXPERT, FLOPS_PER_ROW)
    stream_s = cost.stream_seconds(k * EXPERT)
    cpu_s = cost.cpu_seconds((256 - k) * EXPERT, (256 - k) * 8 * FLOPS_PER_ROW)
    assert 0 < k < 256 and abs(stream_s - cpu_s) < cost.stream_seconds(EXPERT) + cost.cpu_seconds(
        EXPERT, 8 * FLOPS_PER_ROW
    )
    assert max(stream_s, cpu_s) < 0.17


def test_the_busiest_cold_experts_stream():
    """Experts with many rows are worth their copy; those with a row or two are read as fast by the CPU."""
    cost = StreamCost(cpu_bytes_per_s=40e9, cpu_flops_per_s=0.4e12, stream_bytes_per_s=25e9)
    assert cost.stream_count(512, [300, 150, 1, 1, 1], EXPERT, FLOPS_PER_ROW) == 2
    # with a stream this slow, nothing is worth streaming
    assert StreamCost(stream_bytes_per_s=1e6).stream_count(512, [300, 1], EXPERT, FLOPS_PER_ROW) == 0


def test_rates_are_learned_from_what_runs():
    cost = StreamCost(cpu_bytes_per_s=20e9, cpu_flops_per_s=0.5e12, stream_bytes_per_s=10e9)
    for _ in range(30):
        cost.observe_cpu(1.0, 8 * EXPERT, 8 * FLOPS_PER_ROW, 8 * EXPERT / 50e9)  # light steps: bandwidth
        cost.observe_stream(256 * EXPERT, 256 * EXPERT / 40e9)
    assert (
        abs(cost.cpu_bytes_per_s - 50e9) / 50e9 < 0.01 and abs(cost.stream_bytes_per_s - 40e9) / 40e9 < 0.01
    )
    heavy_seconds = 256 * EXPERT / 50e9 + 2048 * FLOPS_PER_ROW / 2e12  # read, then 2 TFLOP/s of arithmetic
    for _ in range(30):
        cost.observe_cpu(8.0, 256 * EXPERT, 2048 * FLOPS_PER_ROW, heavy_seconds)
    assert abs(cost.cpu_flops_per_s - 2e12) / 2e12 < 0.01
