using System.Text.RegularExpressions;

namespace LoraSharp.Formats;

public enum BaseFamily { Unknown, SD1, SD2, SDXL, Llama }

/// <summary>What an adapter (or a model) was made for, and why we think so.</summary>
public sealed record BaseModelGuess(BaseFamily Family, string Description, string Evidence)
{
    /// <summary>Cross-attention width of an SD UNet (768 SD1, 1024 SD2, 2048 SDXL), when seen.</summary>
    public long? ContextDim { get; init; }

    /// <summary>Hidden size of a language model, when seen.</summary>
    public long? HiddenSize { get; init; }

    /// <summary>Number of decoder layers seen (a lower bound for adapters that skip the last layers).</summary>
    public int? Layers { get; init; }

    public static readonly BaseModelGuess Unknown = new(BaseFamily.Unknown, "an unknown base", "no recognisable keys");
}

/// <summary>Detects the base model family from keys, shapes and metadata.</summary>
public static partial class BaseModelDetector
{
    [GeneratedRegex(@"(?:^|[._])layers[._](\d+)[._]")]
    private static partial Regex LayerIndex();

    /// <summary>From an adapter file's metadata and (key, shape) pairs.</summary>
    public static BaseModelGuess DetectAdapter(IReadOnlyDictionary<string, string> metadata, IEnumerable<(string Key, long[] Shape)> tensors)
    {
        var list = tensors.ToList();
        var keys = list.Select(t => t.Key).ToList();

        // LLM (PEFT on a Llama-family model).
        var llm = list.Where(t => t.Key.Contains("self_attn.q_proj", StringComparison.Ordinal) || t.Key.Contains("self_attn.k_proj", StringComparison.Ordinal)
                               || t.Key.Contains("self_attn.v_proj", StringComparison.Ordinal) || t.Key.Contains("self_attn.o_proj", StringComparison.Ordinal)
                               || t.Key.Contains("mlp.gate_proj", StringComparison.Ordinal))
                      .Where(t => t.Key.Contains("model.layers.", StringComparison.Ordinal)).ToList();
        if (llm.Count > 0)
        {
            long? hidden = llm.Where(t => IsDown(t.Key) && !t.Key.Contains("o_proj", StringComparison.Ordinal) && !t.Key.Contains("down_proj", StringComparison.Ordinal))
                              .Select(t => (long?)t.Shape[^1]).FirstOrDefault();
            int layers = llm.Select(t => LayerIndex().Match(t.Key)).Where(m => m.Success).Select(m => int.Parse(m.Groups[1].Value)).DefaultIfEmpty(-1).Max() + 1;
            return new BaseModelGuess(BaseFamily.Llama, $"a Llama-family model (hidden size {hidden?.ToString() ?? "?"}, ≥{layers} layers)",
                "PEFT keys on model.layers.N.self_attn/mlp") { HiddenSize = hidden, Layers = layers };
        }

        long? context = list.Where(t => IsDown(t.Key) && (t.Key.Contains("attn2_to_k", StringComparison.Ordinal) || t.Key.Contains("attn2.to_k", StringComparison.Ordinal)))
                            .Select(t => (long?)t.Shape[1]).FirstOrDefault();
        long? teWidth = list.Where(t => IsDown(t.Key) && (t.Key.StartsWith("lora_te_", StringComparison.Ordinal) || t.Key.StartsWith("lora_te1_", StringComparison.Ordinal)
                                                       || t.Key.StartsWith("text_encoder.", StringComparison.Ordinal))
                                     && (t.Key.Contains("q_proj", StringComparison.Ordinal)))
                            .Select(t => (long?)t.Shape[1]).FirstOrDefault();

        // Metadata written by kohya / modelspec.
        string? version = metadata.GetValueOrDefault("ss_base_model_version");
        string? arch = metadata.GetValueOrDefault("modelspec.architecture");
        BaseFamily? fromMeta = null;
        string metaEvidence = "";
        if (arch is not null)
        {
            fromMeta = arch.StartsWith("stable-diffusion-xl", StringComparison.Ordinal) ? BaseFamily.SDXL
                : arch.StartsWith("stable-diffusion-v2", StringComparison.Ordinal) ? BaseFamily.SD2
                : arch.StartsWith("stable-diffusion-v1", StringComparison.Ordinal) ? BaseFamily.SD1 : null;
            metaEvidence = $"modelspec.architecture={arch}";
        }
        if (fromMeta is null && version is not null)
        {
            fromMeta = version.StartsWith("sdxl", StringComparison.Ordinal) ? BaseFamily.SDXL
                : version.StartsWith("sd_v2", StringComparison.Ordinal) ? BaseFamily.SD2
                : version.StartsWith("sd_v1", StringComparison.Ordinal) ? BaseFamily.SD1 : null;
            metaEvidence = $"ss_base_model_version={version}";
        }
        if (fromMeta is null && metadata.TryGetValue("ss_v2", out var v2) && v2 == "True") { fromMeta = BaseFamily.SD2; metaEvidence = "ss_v2=True"; }

        // Structure.
        bool sdxlNames = keys.Any(k => k.StartsWith("lora_te1_", StringComparison.Ordinal) || k.StartsWith("lora_te2_", StringComparison.Ordinal)
                                    || k.StartsWith("text_encoder_2.", StringComparison.Ordinal));
        bool sgmUnet = keys.Any(k => k.StartsWith("lora_unet_input_blocks_", StringComparison.Ordinal) || k.StartsWith("lora_unet_output_blocks_", StringComparison.Ordinal)
                                  || k.StartsWith("lora_unet_middle_block_", StringComparison.Ordinal));
        bool sdKeys = keys.Any(k => k.StartsWith("lora_unet_", StringComparison.Ordinal) || k.StartsWith("lora_te", StringComparison.Ordinal)
                                 || k.StartsWith("unet.", StringComparison.Ordinal) || k.StartsWith("text_encoder", StringComparison.Ordinal));

        BaseFamily? fromShapes = context switch
        {
            768 => BaseFamily.SD1,
            1024 => BaseFamily.SD2,
            2048 => BaseFamily.SDXL,
            _ => teWidth switch { 768 => BaseFamily.SD1, 1024 => BaseFamily.SD2, _ => null },
        };
        BaseFamily family = fromShapes ?? fromMeta ?? (sdxlNames ? BaseFamily.SDXL : sgmUnet && !sdxlNames ? BaseFamily.SDXL : sdKeys ? BaseFamily.SD1 : BaseFamily.Unknown);
        if (family == BaseFamily.Unknown) return BaseModelGuess.Unknown;

        var evidence = new List<string>();
        if (context is not null) evidence.Add($"cross-attention width {context}");
        if (teWidth is not null) evidence.Add($"text encoder width {teWidth}");
        if (metaEvidence.Length > 0) evidence.Add(metaEvidence);
        if (sdxlNames) evidence.Add("two text encoders");
        if (evidence.Count == 0) evidence.Add("SD key names");
        return new BaseModelGuess(family, Describe(family, context), string.Join(", ", evidence)) { ContextDim = context };
    }

    /// <summary>From a target model's module index (paths and weight shapes).</summary>
    public static BaseModelGuess DetectModel(ModuleIndex index)
    {
        var paths = index.Paths;
        var q = paths.FirstOrDefault(p => p.EndsWith("self_attn.q_proj", StringComparison.Ordinal) && p.Contains("model.layers.", StringComparison.Ordinal)
                                          && !p.StartsWith("text_encoder", StringComparison.Ordinal));
        if (q is not null)
        {
            int layers = paths.Select(p => LayerIndex().Match(p)).Where(m => m.Success).Select(m => int.Parse(m.Groups[1].Value)).DefaultIfEmpty(-1).Max() + 1;
            long hidden = index.WeightShape(q)[1];
            return new BaseModelGuess(BaseFamily.Llama, $"a Llama-family model (hidden size {hidden}, {layers} layers)", "model.layers.N") { HiddenSize = hidden, Layers = layers };
        }
        var k = paths.FirstOrDefault(p => p.StartsWith("unet.", StringComparison.Ordinal) && p.EndsWith("attn2.to_k", StringComparison.Ordinal));
        if (k is null) return BaseModelGuess.Unknown;
        long context = index.WeightShape(k)[1];
        bool twoEncoders = paths.Any(p => p.StartsWith("text_encoder_2.", StringComparison.Ordinal));
        var family = twoEncoders || context == 2048 ? BaseFamily.SDXL : context == 1024 ? BaseFamily.SD2 : BaseFamily.SD1;
        return new BaseModelGuess(family, Describe(family, context), $"cross-attention width {context}") { ContextDim = context };
    }

    static string Describe(BaseFamily family, long? context) => family switch
    {
        BaseFamily.SD1 => "SD1.x" + (context is { } c && c != 768 ? $" (cross-attention width {c})" : ""),
        BaseFamily.SD2 => "SD2.x" + (context is { } c2 && c2 != 1024 ? $" (cross-attention width {c2})" : ""),
        BaseFamily.SDXL => "SDXL" + (context is { } c3 && c3 != 2048 ? $" (cross-attention width {c3})" : ""),
        BaseFamily.Llama => "a Llama-family model",
        _ => "an unknown base",
    };

    static bool IsDown(string key) => key.EndsWith("lora_down.weight", StringComparison.Ordinal) || key.EndsWith("hada_w1_b", StringComparison.Ordinal) || key.EndsWith("lora_A.weight", StringComparison.Ordinal)
                                   || key.EndsWith("lora.down.weight", StringComparison.Ordinal) || key.EndsWith(".down.weight", StringComparison.Ordinal);
}
