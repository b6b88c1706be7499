using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Models.Llama;

/// <summary>SiLU-gated feed-forward: <c>down_proj(silu(gate_proj(x)) * up_proj(x))</c>.</summary>
public sealed class LlamaMlp : nn.Module<Tensor, Tensor>
{
    public Linear GateProj { get; }
    public Linear UpProj { get; }
    public Linear DownProj { get; }

    public LlamaMlp(LlamaConfig config, LlamaWeights weights) : base(nameof(LlamaMlp))
    {
        GateProj = weights.Linear(config.HiddenSize, config.IntermediateSize, config.MlpBias);
        UpProj = weights.Linear(config.HiddenSize, config.IntermediateSize, config.MlpBias);
        DownProj = weights.Linear(config.IntermediateSize, config.HiddenSize, config.MlpBias);
        register_module("gate_proj", GateProj);
        register_module("up_proj", UpProj);
        register_module("down_proj", DownProj);
    }

    /// <summary>Children are registered explicitly under their checkpoint names; no reflection over fields.</summary>
    protected override void RegisterComponents() { }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var gated = nn.functional.silu(GateProj.call(x)) * UpProj.call(x);
        return DownProj.call(gated).MoveToOuterDisposeScope();
    }
}
