using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Models.Llama;

/// <summary>How a freshly built model fills its parameters.</summary>
public enum WeightInit
{
    /// <summary>Uninitialized memory: for models whose weights are loaded right after (no time or pages spent on values).</summary>
    Empty,
    /// <summary>HF's init: Linear and Embedding ~ N(0, initializer std), norm weights 1, biases 0.</summary>
    Random,
}

/// <summary>Creates the parameters of the Llama modules on one device and dtype, empty or initialized.</summary>
public sealed class LlamaWeights(ScalarType dtype, Device device, WeightInit init, double std = 0.02, Generator? generator = null)
{
    public ScalarType DType { get; } = dtype;
    public Device Device { get; } = device;

    Parameter Make(long[] shape, Action<Tensor> fill)
    {
        var t = torch.empty(shape, dtype: DType, device: Device);
        if (init == WeightInit.Random)
            using (torch.no_grad()) fill(t);
        return new Parameter(t, requires_grad: false);
    }

    /// <summary>A <c>[rows, cols]</c> matrix ~ N(0, std) (Linear weight, Embedding table).</summary>
    public Parameter Matrix(long rows, long cols) => Make([rows, cols], t => t.normal_(0, std, generator));

    public Parameter Ones(long n) => Make([n], t => t.fill_(1.0));

    public Parameter Zeros(long n) => Make([n], t => t.zero_());

    /// <summary>An <c>nn.Linear</c> with weight <c>[out, in]</c> and optional bias, using these parameters (no default init).</summary>
    public Linear Linear(long inFeatures, long outFeatures, bool bias) =>
        nn.Linear(Matrix(outFeatures, inFeatures), bias ? Zeros(outFeatures) : null);
}
