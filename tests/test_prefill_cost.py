"""The prefill cost model: stream cold experts to the GPU only when the CPU would take longer."""

from dsrun.offload.prefill import StreamCost

EXPERT = 25_000_000  # bytes of a DeepSeek-V3 Q4_K expert
FLOPS_PER_ROW = 2 * 3 * 7168 * 2048


def test_decode_stays_on_the_cpu_and_prefill_streams():
    cost = StreamCost(cpu_bytes_per_s=40e9, cpu_flops_per_s=0.4e12, stream_bytes_per_s=25e9)
    # decode: 8 experts, a row each, read-bound on the CPU at 40 GB/s beats 25 GB/s over PCIe
    assert not cost.should_stream(1, 8 * EXPERT, 8 * FLOPS_PER_ROW)
    # prefill: 256 experts, 8 rows each: at 0.4 TFLOP/s the CPU is compute-bound, 0.45 s against 0.26 s
    assert cost.should_stream(256, 256 * EXPERT, 2048 * FLOPS_PER_ROW)
    # a few tokens never stream, whatever the numbers say
    assert not StreamCost(stream_bytes_per_s=1e30).should_stream(4, 1e9, 1e15)


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
