using static TorchSharp.torch;

namespace LoraSharp.Tests.IO;

internal static class TensorAssert
{
    /// <summary>Same dtype, same shape, same bytes (NaN payloads and signed zeros included).</summary>
    public static void BitwiseEqual(Tensor expected, Tensor actual, string? what = null)
    {
        Assert.True(expected.dtype == actual.dtype, $"{what}: dtype {actual.dtype}, expected {expected.dtype}");
        Assert.True(expected.shape.SequenceEqual(actual.shape), $"{what}: shape [{string.Join(",", actual.shape)}], expected [{string.Join(",", expected.shape)}]");
        using var a = expected.contiguous();
        using var b = actual.contiguous();
        Assert.True(a.bytes.SequenceEqual(b.bytes), $"{what}: bytes differ");
    }
}
