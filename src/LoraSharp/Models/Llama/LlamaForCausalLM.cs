using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Models.Llama;

/// <summary>
/// A LLaMA-family causal language model (HF <c>LlamaForCausalLM</c>, also Mistral and Qwen2): <c>model</c> and
/// <c>lm_head</c>, registered under the Hugging Face checkpoint names so <c>named_parameters()</c> lists the
/// safetensors keys (<c>model.layers.0.self_attn.q_proj.weight</c>, ...). With tied embeddings <c>lm_head.weight</c>
/// is the same tensor as <c>model.embed_tokens.weight</c>. Every submodule is invoked with <c>call()</c>, so forward
/// hooks on any Linear (adapters) take effect.
/// </summary>
public sealed class LlamaForCausalLM : nn.Module<Tensor, KvCache?, Tensor>
{
    public LlamaConfig Config { get; }
    public LlamaModel Model { get; }
    public Linear LmHead { get; }
    public ScalarType DType { get; }
    public Device Device { get; }

    /// <summary>Builds the model with parameters in <paramref name="dtype"/> on <paramref name="device"/>.</summary>
    /// <param name="init">Empty (to load weights into) or random (HF init, std <paramref name="initStd"/>).</param>
    /// <param name="generator">Random source for <see cref="WeightInit.Random"/>; null = the global one.</param>
    public LlamaForCausalLM(LlamaConfig config, ScalarType dtype = ScalarType.Float32, Device? device = null,
        WeightInit init = WeightInit.Random, double initStd = 0.02, Generator? generator = null) : base(nameof(LlamaForCausalLM))
    {
        if (dtype is not (ScalarType.Float32 or ScalarType.BFloat16 or ScalarType.Float16 or ScalarType.Float64))
            throw new ArgumentException($"dtype must be a floating type (float32, bfloat16, float16), got {dtype}", nameof(dtype));
        Config = config;
        DType = dtype;
        Device = device ?? torch.CPU;
        var weights = new LlamaWeights(dtype, Device, init, initStd, generator);
        Model = new LlamaModel(config, weights);
        LmHead = config.TieWordEmbeddings
            ? nn.Linear(Model.EmbedTokens.weight!)
            : weights.Linear(config.HiddenSize, config.VocabSize, bias: false);
        register_module("model", Model);
        register_module("lm_head", LmHead);
    }

    /// <summary>Children are registered explicitly under their checkpoint names; no reflection over fields.</summary>
    protected override void RegisterComponents() { }

    /// <summary>Logits <c>[batch, seq, vocab]</c> for token ids <c>[batch, seq]</c>; with a cache, the ids are the new positions.</summary>
    public override Tensor forward(Tensor inputIds, KvCache? cache) => Logits(inputIds, cache, lastOnly: false);

    /// <summary>
    /// Logits for <paramref name="inputIds"/>; <paramref name="lastOnly"/> applies lm_head to the last position only
    /// (<c>[batch, 1, vocab]</c>), what generation needs.
    /// </summary>
    /// <param name="positionIds">Optional RoPE positions <c>[batch, seq]</c> (no cache); see <see cref="LlamaModel.Forward"/>.</param>
    /// <param name="attentionMask">Optional boolean <c>[batch, seq, seq]</c> mask replacing the causal one (no cache).</param>
    public Tensor Logits(Tensor inputIds, KvCache? cache = null, bool lastOnly = false, Tensor? positionIds = null, Tensor? attentionMask = null)
    {
        if (inputIds.dim() != 2)
            throw new ArgumentException($"input ids must be [batch, seq], got [{string.Join(", ", inputIds.shape)}]", nameof(inputIds));
        using var scope = NewDisposeScope();
        var hidden = positionIds is null && attentionMask is null
            ? Model.call(inputIds.to(Device), cache)
            : Model.Forward(inputIds.to(Device), cache, positionIds, attentionMask);
        if (lastOnly)
            hidden = hidden.narrow(1, hidden.shape[1] - 1, 1);
        return LmHead.call(hidden).MoveToOuterDisposeScope();
    }

    /// <summary>A cache sized for this model's layers.</summary>
    public KvCache NewCache() => new(Config.NumHiddenLayers);

    /// <summary>Every Linear module by its HF path (<c>model.layers.0.self_attn.q_proj</c>, ..., <c>lm_head</c>): where adapters attach.</summary>
    public IReadOnlyList<(string Path, Linear Module)> LinearModules() =>
        named_modules().Where(m => m.module is Linear).Select(m => (m.name, (Linear)m.module)).ToList();
}
