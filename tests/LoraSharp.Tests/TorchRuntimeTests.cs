using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests;

public class TorchRuntimeTests
{
    [Fact]
    public void Native_library_loads_and_runs_matmul_and_autograd()
    {
        using var scope = NewDisposeScope();
        var a = tensor(new float[] { 1, 2, 3, 4 }).reshape(2, 2).requires_grad_(true);
        var y = a.matmul(a).sum();
        y.backward();
        Assert.Equal(54f, y.item<float>(), 4);
        // d/dA sum(A·A) = 1·Aᵀ + Aᵀ·1 (row/column sums)
        Assert.Equal(new float[] { 7, 11, 9, 13 }, a.grad!.data<float>().ToArray());
    }
}
