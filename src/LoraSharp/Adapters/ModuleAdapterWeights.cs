using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Adapters;

/// <summary>The adapter algorithm of one module, as the file stores it.</summary>
public enum AdapterAlgorithm
{
    /// <summary>LoRA / LoCon: lora_down, lora_up, optional lora_mid (Tucker conv).</summary>
    LoRA,
    /// <summary>LyCORIS LoHa: hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, optional hada_t1, hada_t2.</summary>
    LoHa,
    /// <summary>LyCORIS LoKr: lokr_w1 or lokr_w1_a + lokr_w1_b; lokr_w2 or lokr_w2_a + lokr_w2_b; optional lokr_t2.</summary>
    LoKr,
    /// <summary>Full weight difference: diff (shape of W), optional diff_b (bias).</summary>
    Full,
}

/// <summary>Which tool's scale rules the weights were made under (they differ for LoKr with two full factors).</summary>
public enum ScaleConvention
{
    /// <summary>kohya / LyCORIS / A1111 / ComfyUI: scale alpha/r; LoKr with neither factor decomposed uses 1.</summary>
    LyCORIS,
    /// <summary>PEFT: scale alpha/r always (alpha/√r with rsLoRA).</summary>
    Peft,
}

/// <summary>
/// The file-independent weights of an adapter on one base module, the contract between
/// <c>Formats</c> (which translate file keys to module paths) and <c>Adapters</c> (which do the math).
/// Tensor names are the kohya/LyCORIS suffixes without ".weight": lora_down, lora_up, lora_mid,
/// hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, hada_t1, hada_t2, lokr_w1, lokr_w1_a, lokr_w1_b, lokr_w2,
/// lokr_w2_a, lokr_w2_b, lokr_t2, diff, diff_b; DoRA: dora_scale (kohya/LyCORIS layout, [out,1(,1,1)] or
/// [1,in(,1,1)]) or magnitude (PEFT lora_magnitude_vector, [out]). PEFT lora_A = lora_down, lora_B = lora_up.
/// </summary>
public sealed class ModuleAdapterWeights : IDisposable
{
    /// <summary>Dotted module path in the target model, e.g. model.layers.0.self_attn.q_proj.</summary>
    public required string ModulePath { get; init; }

    public required AdapterAlgorithm Algorithm { get; init; }

    public required IReadOnlyDictionary<string, Tensor> Tensors { get; init; }

    /// <summary>The alpha to use; null means "alpha = rank" (scale 1), what kohya and A1111 do for files without alpha.</summary>
    public double? Alpha { get; init; }

    /// <summary>
    /// The r of alpha/r when the factors do not show it — PEFT LoKr with both factors full uses the config's r.
    /// Null: r comes from the tensors (lora_down rows, hada_w1_b rows, the decomposed LoKr factor's rank).
    /// </summary>
    public int? Rank { get; init; }

    /// <summary>rsLoRA: scale alpha/√r instead of alpha/r.</summary>
    public bool RsLora { get; init; }

    public ScaleConvention Convention { get; init; } = ScaleConvention.LyCORIS;

    /// <summary>PEFT fan_in_fan_out (GPT-2 Conv1D style base weights stored [in, out]).</summary>
    public bool FanInFanOut { get; init; }

    public Tensor this[string name] => Tensors[name];

    public bool Has(string name) => Tensors.ContainsKey(name);

    public void Dispose()
    {
        foreach (var t in Tensors.Values) t.Dispose();
    }
}

/// <summary>A whole adapter: its modules plus the file's metadata (training settings, hashes).</summary>
public sealed class AdapterWeights : IDisposable
{
    public required string Name { get; init; }

    public required IReadOnlyList<ModuleAdapterWeights> Modules { get; init; }

    public IReadOnlyDictionary<string, string> Metadata { get; init; } = new Dictionary<string, string>();

    public void Dispose()
    {
        foreach (var m in Modules) m.Dispose();
    }
}
