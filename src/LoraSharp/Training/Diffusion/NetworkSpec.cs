using System.Globalization;
using System.Text.Json;
using LoraSharp.Adapters;

namespace LoraSharp.Training.Diffusion;

/// <summary>
/// What network <c>network_module</c> + <c>network_args</c> describe, and which modules kohya trains:
/// UNet — Linear and 1×1-conv children of Transformer2DModel (<c>attentions.N</c>), and with <c>conv_dim</c> also
/// the children of ResnetBlock2D / Downsample2D / Upsample2D (3×3 convs get conv_dim/conv_alpha); text encoders —
/// the Linears of CLIPAttention and CLIPMLP (q/k/v/out_proj, fc1, fc2).
/// </summary>
public sealed record NetworkSpec
{
    /// <summary>lora, locon, loha, lokr or dylora.</summary>
    public required string Kind { get; init; }
    /// <summary>What kohya writes in ss_network_module.</summary>
    public required string KohyaModule { get; init; }
    public required AdapterConfig Adapter { get; init; }
    /// <summary>Train resnet / sampler convs as well (LoCon, kohya "C3Lier").</summary>
    public bool Conv { get; init; }
    /// <summary>LoRA+ (network_args loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio): the up matrices learn this many times faster; null = off.</summary>
    public double? LoraPlusUnetRatio { get; init; }
    public double? LoraPlusTextEncoderRatio { get; init; }
    /// <summary>
    /// kohya's block-wise ranks (network_args block_dims / block_alphas / conv_block_dims / conv_block_alphas, 25 values
    /// each: IN00–IN11, MID, OUT00–OUT11); null = one rank for all. A rank of 0 leaves the block's modules out.
    /// </summary>
    public IReadOnlyList<int>? BlockDims { get; init; }
    public IReadOnlyList<double>? BlockAlphas { get; init; }
    public IReadOnlyList<int>? ConvBlockDims { get; init; }
    public IReadOnlyList<double>? ConvBlockAlphas { get; init; }

    /// <summary>
    /// kohya's block-wise learning-rate weights (network_args down_lr_weight, mid_lr_weight, up_lr_weight,
    /// block_lr_zero_threshold) per block 0..24; null = off. A weight of 0 leaves the block's modules out.
    /// </summary>
    public IReadOnlyList<double>? BlockLrWeights { get; init; }

    /// <summary>
    /// One side's 12 weights (kohya get_block_lr_weight): "w0,w1,…" (fewer values are padded with 1, more are cut),
    /// or a preset <c>sine</c>, <c>cosine</c>, <c>linear</c>, <c>reverse_linear</c>, <c>zeros</c> with an optional
    /// "+offset" (sine: sin(π/2·i/11), cosine: the same reversed, linear: i/11).
    /// </summary>
    public static double[] BlockLrList(string spec)
    {
        const int n = 12;
        if (spec.Contains(','))
        {
            var values = spec.Split(',', StringSplitOptions.TrimEntries).Select(v => double.Parse(v, NumberStyles.Float, CultureInfo.InvariantCulture)).ToList();
            while (values.Count < n) values.Add(1.0);
            return values.Take(n).ToArray();
        }
        var parts = spec.Split('+');
        double offset = parts.Length > 1 ? double.Parse(parts[1], NumberStyles.Float, CultureInfo.InvariantCulture) : 0;
        IEnumerable<int> up = Enumerable.Range(0, n), down = up.Reverse();
        double Sin(int i) => Math.Sin(Math.PI * (i / (double)(n - 1)) / 2);
        return (parts[0].Trim() switch
        {
            "sine" => up.Select(Sin),
            "cosine" => down.Select(Sin),
            "linear" => up.Select(i => i / (double)(n - 1)),
            "reverse_linear" => down.Select(i => i / (double)(n - 1)),
            "zeros" => up.Select(_ => 0.0),
            var other => throw new FormatException($"'{other}' is neither 12 comma-separated weights nor sine, cosine, linear, reverse_linear or zeros"),
        }).Select(w => w + offset).ToArray();
    }

    /// <summary>The learning-rate weight of a UNet module's block (1 outside the blocks or when block weights are off).</summary>
    public double LrWeightOf(string modulePath)
    {
        if (BlockLrWeights is null) return 1;
        int block = KohyaBlockIndex(modulePath);
        return block < 0 ? 1 : BlockLrWeights[block];
    }

    /// <summary>Number of kohya blocks (SD 1.x / 2.x UNet): 12 input, the middle, 12 output.</summary>
    public const int KohyaBlocks = 25;

    /// <summary>
    /// kohya's block index of a UNet module path (networks.lora get_block_index): down_blocks.i.(resnets|attentions).j →
    /// 1 + 3i + j, down_blocks.i.downsamplers → 1 + 3i + 2, mid_block → 12, up_blocks.i.… → 13 + 3i + j (upsamplers:
    /// 13 + 3i + 2); −1 for modules outside these blocks.
    /// </summary>
    public static int KohyaBlockIndex(string modulePath)
    {
        var m = System.Text.RegularExpressions.Regex.Match(modulePath, @"(up|down)_blocks\.(\d+)\.(resnets|upsamplers|downsamplers|attentions)\.(\d+)\.");
        if (m.Success)
        {
            int i = int.Parse(m.Groups[2].Value, CultureInfo.InvariantCulture), j = int.Parse(m.Groups[4].Value, CultureInfo.InvariantCulture);
            int idx = m.Groups[3].Value is "upsamplers" or "downsamplers" ? 3 * i + 2 : 3 * i + j;
            return m.Groups[1].Value == "down" ? 1 + idx : 13 + idx;
        }
        return modulePath.Contains("mid_block.", StringComparison.Ordinal) ? 12 : -1;
    }

    /// <summary>The adapter configuration of one module (block-wise ranks applied to UNet modules); null = leave it out.</summary>
    public AdapterConfig? ConfigFor(string modulePath, LayerGeometry geometry)
    {
        if (modulePath.StartsWith("unet.", StringComparison.Ordinal) && LrWeightOf(modulePath) == 0) return null; // kohya: a block with lr weight 0 is not created
        if (BlockDims is null || !modulePath.StartsWith("unet.", StringComparison.Ordinal)) return Adapter;
        int block = KohyaBlockIndex(modulePath);
        if (block < 0) return Adapter;
        bool kxk = geometry.IsConv && !geometry.IsPointwise;
        if (!kxk)
            return BlockDims[block] == 0 ? null : Adapter with { Rank = BlockDims[block], Alpha = BlockAlphas![block] };
        if (ConvBlockDims is null || ConvBlockDims[block] == 0) return null;
        return Adapter with { ConvRank = ConvBlockDims[block], ConvAlpha = ConvBlockAlphas![block] };
    }

    /// <summary>ss_network_args (JSON object of the network args kohya records).</summary>
    public required IReadOnlyDictionary<string, string> Args { get; init; }

    public const string UnetAttentionPattern = @"unet\.(down_blocks\.\d+\.attentions|mid_block\.attentions|up_blocks\.\d+\.attentions)\.\d+\..+";
    public const string UnetConvPattern = @"unet\.((down_blocks|up_blocks)\.\d+\.(resnets\.\d+|downsamplers\.0|upsamplers\.0)|mid_block\.resnets\.\d+)\..+";
    public const string TextEncoderPattern = @"text_encoder(_2)?\.text_model\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))";

    /// <summary>The UNet modules to train.</summary>
    public ModuleSelector UnetSelector()
    {
        var s = ModuleSelector.Regex(UnetAttentionPattern);
        return Conv ? s.IncludeRegex(UnetConvPattern) : s;
    }

    /// <summary>The text encoder modules to train (both encoders of SDXL).</summary>
    public static ModuleSelector TextEncoderSelector() => ModuleSelector.Regex(TextEncoderPattern);

    /// <summary>Builds the spec from a config; bad values throw naming the option.</summary>
    public static NetworkSpec From(SdTrainConfig c)
    {
        var args = c.NetworkArgDictionary();
        double? Arg(string k)
        {
            if (!args.TryGetValue(k, out var v)) return null;
            if (!double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture, out var d))
                throw new LoraSharpException($"network_args {k}={v}: expected a number", "config", "network_args");
            return d;
        }
        bool Flag(string k) => args.TryGetValue(k, out var v) && v.ToLowerInvariant() is "true" or "1" or "yes";

        string module = c.NetworkModule.Trim();
        string kind = module switch
        {
            "lora" or "networks.lora" => "lora",
            "locon" => "locon",
            "loha" => "loha",
            "lokr" => "lokr",
            "dylora" or "networks.dylora" => "dylora",
            "lycoris.kohya" => (args.TryGetValue("algo", out var algo) ? algo.ToLowerInvariant() : "lora") switch
            {
                "lora" or "locon" => "locon",
                "loha" => "loha",
                "lokr" => "lokr",
                "dylora" => "dylora",
                var other => throw new LoraSharpException($"network_args algo={other} is not supported (expected lora, locon, loha, lokr or dylora)", "config", "network_args"),
            },
            _ => throw new LoraSharpException($"network_module '{module}' is not supported (expected lora, locon, loha, lokr, dylora, networks.lora, networks.dylora or lycoris.kohya)", "config", "network_module"),
        };
        int? convDim = c.ConvDim ?? (int?)Arg("conv_dim");
        double? convAlpha = c.ConvAlpha ?? Arg("conv_alpha");
        // kohya: conv_alpha defaults to 1 when conv_dim is given; "locon" always trains convs (LyCORIS default conv_dim = dim).
        if (kind == "locon" && convDim is null) convDim = c.NetworkDim;
        if (convDim is not null && convAlpha is null) convAlpha = 1;
        bool conv = convDim is not null || ((kind is "loha" or "lokr") && args.ContainsKey("conv_dim"));
        var dropout = new AdapterDropout
        {
            Network = c.NetworkDropout ?? Arg("dropout") ?? 0,
            Rank = c.RankDropout ?? Arg("rank_dropout") ?? 0,
            Module = c.ModuleDropout ?? Arg("module_dropout") ?? 0,
        };
        foreach (var (n, p) in new[] { ("network_dropout", dropout.Network), ("rank_dropout", dropout.Rank), ("module_dropout", dropout.Module) })
            if (p < 0 || p >= 1) throw new LoraSharpException($"must be in [0, 1), got {p}", "config", n);
        var adapter = new AdapterConfig
        {
            Algorithm = kind switch { "loha" => AdapterAlgorithm.LoHa, "lokr" => AdapterAlgorithm.LoKr, _ => AdapterAlgorithm.LoRA },
            Rank = c.NetworkDim,
            Alpha = c.NetworkAlpha,
            ConvRank = convDim,
            ConvAlpha = convAlpha,
            DyLoraUnit = kind == "dylora" ? (int)(Arg("unit") ?? 1) : null,
            Dropout = dropout,
            LokrFactor = (int)(Arg("factor") ?? -1),
            DecomposeBoth = Flag("decompose_both"),
            UseTucker = Flag("use_tucker") || Flag("use_cp"),
        };
        if (adapter.DyLoraUnit is { } u && (u < 1 || c.NetworkDim % u != 0))
            throw new LoraSharpException($"DyLoRA unit {u} must divide network_dim {c.NetworkDim}", "config", "network_args");
        var recorded = new SortedDictionary<string, string>(StringComparer.Ordinal);
        foreach (var (k, v) in args) recorded[k] = v;
        if (convDim is not null) recorded["conv_dim"] = convDim.Value.ToString(CultureInfo.InvariantCulture);
        if (convAlpha is not null) recorded["conv_alpha"] = convAlpha.Value.ToString(CultureInfo.InvariantCulture);
        if (kind is "locon" or "loha" or "lokr" && !recorded.ContainsKey("algo")) recorded["algo"] = kind == "locon" ? "locon" : kind;
        if (dropout.Rank > 0) recorded["rank_dropout"] = dropout.Rank.ToString(CultureInfo.InvariantCulture);
        if (dropout.Module > 0) recorded["module_dropout"] = dropout.Module.ToString(CultureInfo.InvariantCulture);
        // kohya get_block_dims_and_alphas: 25 comma-separated values each; alphas default to network_alpha (conv: conv_alpha or 1)
        T[]? List<T>(string key, Func<string, T> parse)
        {
            if (!args.TryGetValue(key, out var v)) return null;
            try
            {
                var items = v.Split(',', StringSplitOptions.TrimEntries).Select(parse).ToArray();
                if (items.Length != KohyaBlocks) throw new LoraSharpException($"network_args {key} has {items.Length} values, expected {KohyaBlocks} (IN00–IN11, MID, OUT00–OUT11)", "config", "network_args");
                return items;
            }
            catch (FormatException) { throw new LoraSharpException($"network_args {key}={v}: expected {KohyaBlocks} comma-separated numbers", "config", "network_args"); }
        }
        int ParseInt(string x) => int.Parse(x, NumberStyles.Integer, CultureInfo.InvariantCulture);
        double ParseDouble(string x) => double.Parse(x, NumberStyles.Float, CultureInfo.InvariantCulture);
        var blockDims = List("block_dims", ParseInt);
        var blockAlphas = List("block_alphas", ParseDouble);
        var convBlockDims = List("conv_block_dims", ParseInt);
        var convBlockAlphas = List("conv_block_alphas", ParseDouble);
        if ((blockAlphas ?? (object?)convBlockDims ?? convBlockAlphas) is not null && blockDims is null)
            throw new LoraSharpException("block_alphas / conv_block_dims / conv_block_alphas need block_dims", "config", "network_args");
        if (blockDims is not null)
        {
            if (kind is not ("lora" or "locon")) throw new LoraSharpException($"block_dims applies to LoRA / LoCon (kohya networks.lora), not to {kind}", "config", "network_args");
            if (blockDims.Concat(convBlockDims ?? []).Any(d => d < 0)) throw new LoraSharpException("block dims must not be negative", "config", "network_args");
            blockAlphas ??= Enumerable.Repeat(c.NetworkAlpha, KohyaBlocks).ToArray();
            if (convBlockDims is null && convDim is not null) convBlockDims = Enumerable.Repeat(convDim.Value, KohyaBlocks).ToArray();
            if (convBlockDims is not null) convBlockAlphas ??= Enumerable.Repeat(convAlpha ?? 1.0, KohyaBlocks).ToArray();
            conv = convBlockDims is not null;
        }
        double[]? blockLr = null;
        if (args.ContainsKey("down_lr_weight") || args.ContainsKey("mid_lr_weight") || args.ContainsKey("up_lr_weight"))
        {
            if (kind is not ("lora" or "locon")) throw new LoraSharpException($"block learning-rate weights apply to LoRA / LoCon (kohya networks.lora), not to {kind}", "config", "network_args");
            try
            {
                var downW = args.TryGetValue("down_lr_weight", out var downSpec) ? BlockLrList(downSpec) : Enumerable.Repeat(1.0, 12).ToArray();
                var upW = args.TryGetValue("up_lr_weight", out var upSpec) ? BlockLrList(upSpec) : Enumerable.Repeat(1.0, 12).ToArray();
                double midW = Arg("mid_lr_weight") ?? 1.0;
                double threshold = Arg("block_lr_zero_threshold") ?? 0;
                blockLr = [.. downW, midW, .. upW];
                if (threshold > 0) blockLr = blockLr.Select(w => w > threshold ? w : 0).ToArray();
                if (blockLr.Any(w => w < 0)) throw new FormatException("weights must not be negative");
            }
            catch (FormatException e) { throw new LoraSharpException($"network_args block learning-rate weights: {e.Message}", "config", "network_args"); }
        }
        double? plus = Arg("loraplus_lr_ratio");
        double? plusUnet = Arg("loraplus_unet_lr_ratio") ?? plus, plusTe = Arg("loraplus_text_encoder_lr_ratio") ?? plus;
        foreach (var r in new[] { plusUnet, plusTe })
            if (r is <= 0) throw new LoraSharpException($"LoRA+ ratio must be positive, got {r}", "config", "network_args");
        if ((plusUnet ?? plusTe) is not null && kind is "loha" or "lokr")
            throw new LoraSharpException($"loraplus_*_lr_ratio applies to the up matrices of LoRA / LoCon / DyLoRA, not to {kind}", "config", "network_args");
        return new NetworkSpec
        {
            BlockDims = blockDims, BlockAlphas = blockAlphas, ConvBlockDims = convBlockDims, ConvBlockAlphas = convBlockAlphas, BlockLrWeights = blockLr,
            LoraPlusUnetRatio = plusUnet,
            LoraPlusTextEncoderRatio = plusTe,
            Kind = kind,
            KohyaModule = kind switch { "lora" => "networks.lora", "dylora" => "networks.dylora", _ => "lycoris.kohya" },
            Adapter = adapter,
            Conv = conv,
            Args = recorded,
        };
    }

    /// <summary>ss_network_args value.</summary>
    public string ArgsJson() => JsonSerializer.Serialize(Args);
}
