using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Models.Llama;

/// <summary>
/// Root-mean-square layer norm as HF LlamaRMSNorm computes it: in float32,
/// <c>weight * (x * rsqrt(mean(x²) + eps)).to(input dtype)</c>. Parameter: <c>weight [hidden]</c>.
/// </summary>
public sealed class RmsNorm : nn.Module<Tensor, Tensor>
{
    readonly double _eps;

    public Parameter weight { get; }

    public RmsNorm(Parameter weight, double eps) : base(nameof(RmsNorm))
    {
        _eps = eps;
        this.weight = weight;
        register_parameter("weight", weight);
    }

    /// <summary>Children are registered explicitly under their checkpoint names; no reflection over fields.</summary>
    protected override void RegisterComponents() { }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var x32 = x.to_type(ScalarType.Float32);
        var normed = x32 * torch.rsqrt(x32.pow(2).mean([-1L], keepdim: true) + _eps);
        return (weight * normed.to_type(x.dtype)).MoveToOuterDisposeScope();
    }
}
