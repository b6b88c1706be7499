using static TorchSharp.torch;

namespace LoraSharp.Adapters;

/// <summary>Training-only dropouts of an adapter (all probabilities; 0 = off). None of them acts in eval mode.</summary>
public sealed record AdapterDropout
{
    public static AdapterDropout None { get; } = new();

    /// <summary>PEFT <c>lora_dropout</c>: dropout on the input x before <c>lora_down</c> (LoRA only).</summary>
    public double Input { get; init; }

    /// <summary>kohya <c>network_dropout</c>: dropout on the r-channel output of <c>lora_down</c> (LoRA only).</summary>
    public double Network { get; init; }

    /// <summary>
    /// kohya <c>rank_dropout</c> (LoRA: mask [batch, r] on the down output, scale × 1/(1−p)); LyCORIS LoHa/LoKr/Full:
    /// mask over output rows of ΔW, divided by its mean when <see cref="RankDropoutScale"/>.
    /// </summary>
    public double Rank { get; init; }

    /// <summary>LyCORIS <c>rank_dropout_scale</c> for LoHa/LoKr.</summary>
    public bool RankDropoutScale { get; init; }

    /// <summary>kohya/LyCORIS <c>module_dropout</c>: skip the whole adapter with this probability per forward.</summary>
    public double Module { get; init; }

    internal bool Any => Input > 0 || Network > 0 || Rank > 0 || Module > 0;

    internal void Validate()
    {
        foreach (var (n, p) in new[] { ("Input", Input), ("Network", Network), ("Rank", Rank), ("Module", Module) })
            if (p < 0 || p >= 1) throw new ArgumentOutOfRangeException(n, $"Dropout probability {n} must be in [0, 1), got {p}.");
    }
}

/// <summary>Which DoRA variant an adapter carries.</summary>
public enum DoraKind
{
    None,
    /// <summary>PEFT <c>use_dora</c>: learned magnitude vector [out] (key lora_magnitude_vector / "magnitude").</summary>
    Peft,
    /// <summary>kohya / LyCORIS <c>dora_wd</c>: <c>dora_scale</c> [out, 1(,1,1)] (or the legacy input axis).</summary>
    DoraScale,
}

/// <summary>How a new LoRA's factors start.</summary>
public enum LoraInit
{
    /// <summary>down kaiming-uniform (a = √5, i.e. U(±1/√fan_in)), up zero: MS LoRA / kohya / PEFT default.</summary>
    KaimingUniform,
    /// <summary>PEFT "gaussian": down N(0, 1/r), up zero.</summary>
    Gaussian,
}

/// <summary>Hyper-parameters of a new trainable adapter (what PEFT calls the config, kohya the network args).</summary>
public sealed record AdapterConfig
{
    public AdapterAlgorithm Algorithm { get; init; } = AdapterAlgorithm.LoRA;

    /// <summary>r ("dim") for Linear layers.</summary>
    public int Rank { get; init; } = 8;

    /// <summary>Alpha; null = rank (scale 1).</summary>
    public double? Alpha { get; init; }

    /// <summary>kohya <c>conv_dim</c> for k×k Conv2d layers (1×1 convs use <see cref="Rank"/>); null = <see cref="Rank"/>.</summary>
    public int? ConvRank { get; init; }

    /// <summary>kohya <c>conv_alpha</c>; null = <see cref="Alpha"/>.</summary>
    public double? ConvAlpha { get; init; }

    public bool RsLora { get; init; }

    /// <summary>LyCORIS <c>use_tucker</c>: Tucker (lora_mid / hada_t / lokr_t2) form on k×k convs.</summary>
    public bool UseTucker { get; init; }

    public DoraKind Dora { get; init; } = DoraKind.None;

    public LoraInit Init { get; init; } = LoraInit.KaimingUniform;

    /// <summary>LoKr <c>factor</c> (−1 = the split closest to √n).</summary>
    public int LokrFactor { get; init; } = -1;

    /// <summary>LoKr <c>decompose_both</c>: also decompose W1 when the rank is small enough.</summary>
    public bool DecomposeBoth { get; init; }

    /// <summary>LoKr <c>full_matrix</c>: keep both factors full.</summary>
    public bool FullMatrix { get; init; }

    /// <summary>DyLoRA (LoRA only): ordered-rank training updating <c>unit</c> ranks per step; null = plain LoRA.</summary>
    public int? DyLoraUnit { get; init; }

    public AdapterDropout Dropout { get; init; } = AdapterDropout.None;

    public ScaleConvention Convention { get; init; } = ScaleConvention.LyCORIS;

    /// <summary>Storage dtype of the adapter parameters (fp32 master weights by default).</summary>
    public ScalarType DType { get; init; } = ScalarType.Float32;
}
