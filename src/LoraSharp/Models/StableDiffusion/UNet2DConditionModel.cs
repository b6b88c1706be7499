using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Models.StableDiffusion;

/// <summary>
/// Configuration of diffusers' UNet2DConditionModel (<c>unet/config.json</c>), the subset Stable Diffusion 1.x,
/// 2.x and SDXL use. Per-block lists have one entry per down block (level).
/// <see cref="AttentionHeads"/> is the number of heads per level: diffusers' <c>num_attention_heads</c>, or when
/// that is null its (misnamed) <c>attention_head_dim</c>.
/// </summary>
public sealed record UNetConfig
{
    public int InChannels { get; init; } = 4;
    public int OutChannels { get; init; } = 4;
    public int[] BlockOutChannels { get; init; } = [320, 640, 1280, 1280];
    public string[] DownBlockTypes { get; init; } = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"];
    public string[] UpBlockTypes { get; init; } = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"];
    public string MidBlockType { get; init; } = "UNetMidBlock2DCrossAttn";
    public int[] LayersPerBlock { get; init; } = [2, 2, 2, 2];
    public int[] TransformerLayersPerBlock { get; init; } = [1, 1, 1, 1];
    public int[] AttentionHeads { get; init; } = [8, 8, 8, 8];
    public int CrossAttentionDim { get; init; } = 768;
    public bool UseLinearProjection { get; init; }
    /// <summary>Attention scores and softmax in float32 when the model runs in half precision (SD 2.1 sets it).</summary>
    public bool UpcastAttention { get; init; }
    public int NormNumGroups { get; init; } = 32;
    public double NormEps { get; init; } = 1e-5;
    public bool FlipSinToCos { get; init; } = true;
    public double FreqShift { get; init; }
    public int DownsamplePadding { get; init; } = 1;
    public double MidBlockScaleFactor { get; init; } = 1.0;
    public int ConvInKernel { get; init; } = 3;
    public int ConvOutKernel { get; init; } = 3;
    /// <summary>null, or "text_time" (SDXL: pooled text embeds + Fourier features of the size/crop ids).</summary>
    public string? AdditionEmbedType { get; init; }
    public int? AdditionTimeEmbedDim { get; init; }
    public int? ProjectionClassEmbeddingsInputDim { get; init; }
    public int SampleSize { get; init; } = 64;

    public int TimeEmbedDim => BlockOutChannels[0] * 4;

    /// <summary>Reads diffusers' <c>unet/config.json</c>; options Stable Diffusion does not use are refused by name.</summary>
    public static UNetConfig FromJsonFile(string path)
    {
        using var doc = DiffusersJson.Parse(path);
        var r = doc.RootElement;
        var boc = DiffusersJson.Ints(r, "block_out_channels", [320, 640, 1280, 1280]);
        int n = boc.Length;
        void Refuse(string key, string expected)
        {
            if (r.TryGetProperty(key, out var v) && v.ValueKind != System.Text.Json.JsonValueKind.Null && v.ToString() != expected)
                throw new LoraSharpException($"UNet option {key} = {v} is not supported (expected {expected} or null)", path, key);
        }
        Refuse("class_embed_type", "null");
        Refuse("encoder_hid_dim_type", "null");
        Refuse("time_embedding_type", "positional");
        Refuse("resnet_time_scale_shift", "default");
        Refuse("act_fn", "silu");
        Refuse("reverse_transformer_layers_per_block", "null");
        Refuse("dual_cross_attention", "False");
        Refuse("only_cross_attention", "False");
        Refuse("time_cond_proj_dim", "null");
        Refuse("attention_type", "default");
        var heads = DiffusersJson.PerBlock(r, "num_attention_heads", n) ?? DiffusersJson.PerBlock(r, "attention_head_dim", n) ?? Enumerable.Repeat(8, n).ToArray();
        var c = new UNetConfig
        {
            InChannels = DiffusersJson.Int(r, "in_channels", 4),
            OutChannels = DiffusersJson.Int(r, "out_channels", 4),
            BlockOutChannels = boc,
            DownBlockTypes = DiffusersJson.Strings(r, "down_block_types", new UNetConfig().DownBlockTypes),
            UpBlockTypes = DiffusersJson.Strings(r, "up_block_types", new UNetConfig().UpBlockTypes),
            MidBlockType = DiffusersJson.String(r, "mid_block_type", "UNetMidBlock2DCrossAttn"),
            LayersPerBlock = DiffusersJson.PerBlock(r, "layers_per_block", n) ?? Enumerable.Repeat(2, n).ToArray(),
            TransformerLayersPerBlock = DiffusersJson.PerBlock(r, "transformer_layers_per_block", n) ?? Enumerable.Repeat(1, n).ToArray(),
            AttentionHeads = heads,
            CrossAttentionDim = SingleValue(DiffusersJson.PerBlock(r, "cross_attention_dim", n) ?? [1280], path, "cross_attention_dim"),
            UpcastAttention = DiffusersJson.Bool(r, "upcast_attention", false),
            UseLinearProjection = DiffusersJson.Bool(r, "use_linear_projection", false),
            NormNumGroups = DiffusersJson.Int(r, "norm_num_groups", 32),
            NormEps = DiffusersJson.Double(r, "norm_eps", 1e-5),
            FlipSinToCos = DiffusersJson.Bool(r, "flip_sin_to_cos", true),
            FreqShift = DiffusersJson.Double(r, "freq_shift", 0),
            DownsamplePadding = DiffusersJson.Int(r, "downsample_padding", 1),
            MidBlockScaleFactor = DiffusersJson.Double(r, "mid_block_scale_factor", 1.0),
            ConvInKernel = DiffusersJson.Int(r, "conv_in_kernel", 3),
            ConvOutKernel = DiffusersJson.Int(r, "conv_out_kernel", 3),
            AdditionEmbedType = DiffusersJson.StringOrNull(r, "addition_embed_type"),
            AdditionTimeEmbedDim = DiffusersJson.IntOrNull(r, "addition_time_embed_dim"),
            ProjectionClassEmbeddingsInputDim = DiffusersJson.IntOrNull(r, "projection_class_embeddings_input_dim"),
            SampleSize = DiffusersJson.Int(r, "sample_size", 64),
        };
        c.Validate(path);
        return c;
    }

    /// <summary>diffusers' <c>unet/config.json</c> for this config (per-block values collapse to one number when equal).</summary>
    public string ToJson() => DiffusersJson.Write(new Dictionary<string, object?>
    {
        ["_class_name"] = "UNet2DConditionModel",
        ["_diffusers_version"] = DiffusersJson.DiffusersVersion,
        ["act_fn"] = "silu",
        ["addition_embed_type"] = AdditionEmbedType,
        ["addition_time_embed_dim"] = AdditionTimeEmbedDim,
        ["attention_head_dim"] = DiffusersJson.PerBlockValue(AttentionHeads),
        ["block_out_channels"] = BlockOutChannels,
        ["center_input_sample"] = false,
        ["class_embed_type"] = null,
        ["conv_in_kernel"] = ConvInKernel,
        ["conv_out_kernel"] = ConvOutKernel,
        ["cross_attention_dim"] = CrossAttentionDim,
        ["down_block_types"] = DownBlockTypes,
        ["downsample_padding"] = DownsamplePadding,
        ["flip_sin_to_cos"] = FlipSinToCos,
        ["freq_shift"] = FreqShift,
        ["in_channels"] = InChannels,
        ["layers_per_block"] = DiffusersJson.PerBlockValue(LayersPerBlock),
        ["mid_block_scale_factor"] = MidBlockScaleFactor,
        ["mid_block_type"] = MidBlockType,
        ["norm_eps"] = NormEps,
        ["norm_num_groups"] = NormNumGroups,
        ["num_attention_heads"] = null,
        ["out_channels"] = OutChannels,
        ["projection_class_embeddings_input_dim"] = ProjectionClassEmbeddingsInputDim,
        ["sample_size"] = SampleSize,
        ["transformer_layers_per_block"] = DiffusersJson.PerBlockValue(TransformerLayersPerBlock),
        ["up_block_types"] = UpBlockTypes,
        ["upcast_attention"] = UpcastAttention,
        ["use_linear_projection"] = UseLinearProjection,
    });

    static int SingleValue(int[] values, string path, string key) =>
        values.Distinct().Count() == 1 ? values[0] : throw new LoraSharpException($"per-block values [{string.Join(", ", values)}] are not supported", path, key);

    internal void Validate(string source)
    {
        int n = BlockOutChannels.Length;
        if (DownBlockTypes.Length != n || UpBlockTypes.Length != n || LayersPerBlock.Length != n
            || TransformerLayersPerBlock.Length != n || AttentionHeads.Length != n)
            throw new LoraSharpException($"UNet config lists must have one entry per block ({n}): down_block_types, up_block_types, layers_per_block, transformer_layers_per_block, attention heads", source);
        foreach (var t in DownBlockTypes)
            if (t is not ("CrossAttnDownBlock2D" or "DownBlock2D"))
                throw new LoraSharpException($"down block type '{t}' is not supported (CrossAttnDownBlock2D, DownBlock2D)", source);
        foreach (var t in UpBlockTypes)
            if (t is not ("CrossAttnUpBlock2D" or "UpBlock2D"))
                throw new LoraSharpException($"up block type '{t}' is not supported (CrossAttnUpBlock2D, UpBlock2D)", source);
        if (MidBlockType is not "UNetMidBlock2DCrossAttn")
            throw new LoraSharpException($"mid block type '{MidBlockType}' is not supported (UNetMidBlock2DCrossAttn)", source);
        for (int i = 0; i < n; i++)
            if (BlockOutChannels[i] % AttentionHeads[i] != 0)
                throw new LoraSharpException($"block {i}: {BlockOutChannels[i]} channels are not divisible by {AttentionHeads[i]} heads", source);
        if (AdditionEmbedType is not (null or "text_time"))
            throw new LoraSharpException($"addition_embed_type '{AdditionEmbedType}' is not supported (text_time or null)", source);
        if (AdditionEmbedType == "text_time" && (AdditionTimeEmbedDim is null || ProjectionClassEmbeddingsInputDim is null))
            throw new LoraSharpException("addition_embed_type text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim", source);
    }
}

/// <summary>Inputs of one UNet call. SDXL (addition_embed_type text_time) also needs the pooled, projected
/// text embeds [B, P] and the six size/crop numbers per sample [B, 6].</summary>
public sealed record UNetInputs(Tensor Sample, Tensor Timestep, Tensor EncoderHiddenStates, Tensor? TextEmbeds = null, Tensor? TimeIds = null);

/// <summary>
/// diffusers UNet2DConditionModel: conv_in, sinusoidal time_proj → time_embedding (+ SDXL add_time_proj →
/// add_embedding), down_blocks (CrossAttnDownBlock2D / DownBlock2D), mid_block (UNetMidBlock2DCrossAttn),
/// up_blocks (CrossAttnUpBlock2D / UpBlock2D) with skip connections, conv_norm_out → SiLU → conv_out.
/// Parameter names equal diffusers' (<c>down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight</c>).
/// </summary>
public sealed class UNet2DConditionModel : nn.Module<UNetInputs, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    public UNetConfig Config { get; }
    readonly Conv2d _convIn, _convOut;
    readonly TimestepEmbedding _timeEmbedding;
    readonly TimestepEmbedding? _addEmbedding;
    readonly ModuleList<UNetDownBlock> _downBlocks;
    readonly UNetMidBlock2DCrossAttn _midBlock;
    readonly ModuleList<UNetUpBlock> _upBlocks;
    readonly GroupNorm _convNormOut;

    public UNet2DConditionModel(UNetConfig config, Device? device = null, ScalarType? dtype = null) : base(nameof(UNet2DConditionModel))
    {
        config.Validate("UNetConfig");
        Config = config;
        var c = config;
        int n = c.BlockOutChannels.Length;
        long temb = c.TimeEmbedDim;

        _convIn = nn.Conv2d(c.InChannels, c.BlockOutChannels[0], c.ConvInKernel, padding: (c.ConvInKernel - 1) / 2, device: device, dtype: dtype);
        _timeEmbedding = new TimestepEmbedding(c.BlockOutChannels[0], temb, device, dtype);
        register_module("conv_in", _convIn);
        register_module("time_embedding", _timeEmbedding);
        if (c.AdditionEmbedType == "text_time")
        {
            _addEmbedding = new TimestepEmbedding(c.ProjectionClassEmbeddingsInputDim!.Value, temb, device, dtype);
            register_module("add_embedding", _addEmbedding);
        }

        var down = new List<UNetDownBlock>();
        int outCh = c.BlockOutChannels[0];
        for (int i = 0; i < n; i++)
        {
            int inCh = outCh;
            outCh = c.BlockOutChannels[i];
            bool last = i == n - 1;
            down.Add(c.DownBlockTypes[i] == "CrossAttnDownBlock2D"
                ? new CrossAttnDownBlock2D(c, i, inCh, outCh, addDownsample: !last, device, dtype)
                : new DownBlock2D(c, i, inCh, outCh, addDownsample: !last, device, dtype));
        }
        _downBlocks = nn.ModuleList(down.ToArray());
        register_module("down_blocks", _downBlocks);

        _midBlock = new UNetMidBlock2DCrossAttn(c, device, dtype);
        register_module("mid_block", _midBlock);

        var up = new List<UNetUpBlock>();
        var rev = c.BlockOutChannels.Reverse().ToArray();
        outCh = rev[0];
        for (int i = 0; i < n; i++)
        {
            int level = n - 1 - i; // the down level this up block mirrors
            int prevOut = outCh;
            outCh = rev[i];
            int inCh = rev[Math.Min(i + 1, n - 1)];
            bool last = i == n - 1;
            up.Add(c.UpBlockTypes[i] == "CrossAttnUpBlock2D"
                ? new CrossAttnUpBlock2D(c, level, inCh, outCh, prevOut, addUpsample: !last, device, dtype)
                : new UpBlock2D(c, level, inCh, outCh, prevOut, addUpsample: !last, device, dtype));
        }
        _upBlocks = nn.ModuleList(up.ToArray());
        register_module("up_blocks", _upBlocks);

        _convNormOut = Layers.GroupNorm(c.NormNumGroups, c.BlockOutChannels[0], c.NormEps, device: device, dtype: dtype);
        _convOut = nn.Conv2d(c.BlockOutChannels[0], c.OutChannels, c.ConvOutKernel, padding: (c.ConvOutKernel - 1) / 2, device: device, dtype: dtype);
        register_module("conv_norm_out", _convNormOut);
        register_module("conv_out", _convOut);
    }

    /// <summary>Noise (or v) prediction for latents [B, C, H, W], timesteps (scalar, [1] or [B]) and text states [B, T, context].</summary>
    public Tensor Predict(Tensor sample, Tensor timestep, Tensor encoderHiddenStates, Tensor? textEmbeds = null, Tensor? timeIds = null) =>
        call(new UNetInputs(sample, timestep, encoderHiddenStates, textEmbeds, timeIds));

    public override Tensor forward(UNetInputs input)
    {
        using var scope = NewDisposeScope();
        var dtype = _convIn.weight!.dtype; // inputs are converted to the model's dtype
        var sample = input.Sample.to_type(dtype);
        var ehs = input.EncoderHiddenStates.to_type(dtype);
        long batch = sample.shape[0];

        // 1. time: sinusoidal features in fp32, then the embedding MLP in the model's dtype
        var t = input.Timestep.dim() == 0 ? input.Timestep.unsqueeze(0) : input.Timestep;
        t = t.expand(batch);
        var tFeat = TimestepFeatures.Sinusoidal(t, Config.BlockOutChannels[0], Config.FlipSinToCos, Config.FreqShift).to_type(dtype);
        var emb = _timeEmbedding.call(tFeat);
        if (_addEmbedding is not null)
        {
            if (input.TextEmbeds is null || input.TimeIds is null)
                throw new ArgumentException("This UNet (addition_embed_type text_time, SDXL) needs TextEmbeds and TimeIds.", nameof(input));
            var timeIdFeat = TimestepFeatures.Sinusoidal(input.TimeIds.flatten(), Config.AdditionTimeEmbedDim!.Value, Config.FlipSinToCos, Config.FreqShift);
            timeIdFeat = timeIdFeat.reshape(input.TextEmbeds.shape[0], -1);
            var addEmbeds = cat([input.TextEmbeds.to_type(ScalarType.Float32), timeIdFeat], -1).to_type(dtype);
            emb = emb + _addEmbedding.call(addEmbeds);
        }

        // 2. down
        var h = _convIn.call(sample);
        var skips = new List<Tensor> { h };
        foreach (var block in _downBlocks)
        {
            var (hidden, outputs) = block.call(h, emb, ehs);
            h = hidden;
            skips.AddRange(outputs);
        }

        // 3. mid
        h = _midBlock.call(h, emb, ehs);

        // 4. up: each block takes its resnets' count of skips from the end
        foreach (var block in _upBlocks)
        {
            int take = block.ResnetCount;
            var mine = skips.GetRange(skips.Count - take, take);
            skips.RemoveRange(skips.Count - take, take);
            long[]? upsampleSize = skips.Count > 0 ? [skips[^1].shape[2], skips[^1].shape[3]] : null;
            h = block.call(h, new UpBlockContext(emb, ehs, mine, upsampleSize));
        }

        // 5. out
        h = _convOut.call(nn.functional.silu(_convNormOut.call(h)));
        return h.MoveToOuterDisposeScope();
    }
}

/// <summary>Skip tensors for the up path, in the order diffusers collects them.</summary>
public sealed record DownBlockOutput(Tensor Hidden, IReadOnlyList<Tensor> Outputs)
{
    public void Deconstruct(out Tensor hidden, out IReadOnlyList<Tensor> outputs) { hidden = Hidden; outputs = Outputs; }
}

/// <summary>What an up block needs besides the hidden state: time embedding, text states, its skips (last one first
/// consumed) and the size to upsample to.</summary>
public sealed record UpBlockContext(Tensor Temb, Tensor EncoderHiddenStates, IReadOnlyList<Tensor> Skips, long[]? UpsampleSize);

/// <summary>A down block: (hidden, temb, text states) → (hidden, outputs kept for the skip connections).</summary>
public abstract class UNetDownBlock(string name) : nn.Module<Tensor, Tensor, Tensor, DownBlockOutput>(name)
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    /// <summary><c>layers_per_block</c> resnets: the first from <paramref name="inCh"/>, the rest from <paramref name="outCh"/>.</summary>
    protected static ModuleList<ResnetBlock2D> Resnets(UNetConfig c, int level, int inCh, int outCh, Device? device, ScalarType? dtype) =>
        nn.ModuleList(Enumerable.Range(0, c.LayersPerBlock[level])
            .Select(j => new ResnetBlock2D(j == 0 ? inCh : outCh, outCh, c.TimeEmbedDim, c.NormNumGroups, c.NormEps, 1.0, device, dtype)).ToArray());

    /// <summary>Registers <c>downsamplers.0</c> when the block has one.</summary>
    protected ModuleList<Downsample2D>? Downsamplers(UNetConfig c, int outCh, bool add, Device? device, ScalarType? dtype)
    {
        if (!add) return null;
        var list = nn.ModuleList(new Downsample2D(outCh, outCh, c.DownsamplePadding, device, dtype));
        register_module("downsamplers", list);
        return list;
    }

    /// <summary>Each resnet (followed by its attention when there are any), every output kept, then the downsampler.</summary>
    protected static DownBlockOutput Run(Tensor h, Tensor temb, Tensor ehs, ModuleList<ResnetBlock2D> resnets,
        ModuleList<Transformer2DModel>? attentions, ModuleList<Downsample2D>? downsamplers)
    {
        var outputs = new List<Tensor>();
        for (int j = 0; j < resnets.Count; j++)
        {
            h = resnets[j].call(h, temb);
            if (attentions is not null) h = attentions[j].call(h, ehs);
            outputs.Add(h);
        }
        if (downsamplers is not null)
        {
            h = downsamplers[0].call(h);
            outputs.Add(h);
        }
        return new DownBlockOutput(h, outputs);
    }
}

/// <summary>An up block: (hidden, context) → hidden.</summary>
public abstract class UNetUpBlock(string name) : nn.Module<Tensor, UpBlockContext, Tensor>(name)
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    public abstract int ResnetCount { get; }

    /// <summary><c>layers_per_block + 1</c> resnets over the hidden state concatenated with a skip.</summary>
    protected static ModuleList<ResnetBlock2D> Resnets(UNetConfig c, int level, int inCh, int outCh, int prevOutCh, Device? device, ScalarType? dtype)
    {
        int layers = c.LayersPerBlock[level] + 1;
        return nn.ModuleList(Enumerable.Range(0, layers).Select(j =>
        {
            int skipCh = j == layers - 1 ? inCh : outCh;
            int resIn = j == 0 ? prevOutCh : outCh;
            return new ResnetBlock2D(resIn + skipCh, outCh, c.TimeEmbedDim, c.NormNumGroups, c.NormEps, 1.0, device, dtype);
        }).ToArray());
    }

    /// <summary>Registers <c>upsamplers.0</c> when the block has one.</summary>
    protected ModuleList<Upsample2D>? Upsamplers(int outCh, bool add, Device? device, ScalarType? dtype)
    {
        if (!add) return null;
        var list = nn.ModuleList(new Upsample2D(outCh, outCh, device, dtype));
        register_module("upsamplers", list);
        return list;
    }

    /// <summary>Each resnet over (hidden ‖ next skip), followed by its attention when there are any, then the upsampler.</summary>
    protected static Tensor Run(Tensor h, UpBlockContext ctx, ModuleList<ResnetBlock2D> resnets, ModuleList<Transformer2DModel>? attentions,
        ModuleList<Upsample2D>? upsamplers)
    {
        using var scope = NewDisposeScope();
        for (int j = 0; j < resnets.Count; j++)
        {
            var skip = ctx.Skips[ctx.Skips.Count - 1 - j];
            h = resnets[j].call(cat([h, skip], 1), ctx.Temb);
            if (attentions is not null) h = attentions[j].call(h, ctx.EncoderHiddenStates);
        }
        if (upsamplers is not null)
            h = upsamplers[0].call(h, ctx.UpsampleSize);
        return h.MoveToOuterDisposeScope();
    }
}

/// <summary>One Transformer2DModel per resnet of a block (<c>attentions.j</c>).</summary>
static class BlockAttentions
{
    public static ModuleList<Transformer2DModel> Create(UNetConfig c, int level, int outCh, int count, Device? device, ScalarType? dtype) =>
        nn.ModuleList(Enumerable.Range(0, count)
            .Select(_ => new Transformer2DModel(c, outCh, c.AttentionHeads[level], c.TransformerLayersPerBlock[level], device, dtype)).ToArray());
}

/// <summary>diffusers DownBlock2D: <c>resnets</c>, optional <c>downsamplers.0</c>.</summary>
public sealed class DownBlock2D : UNetDownBlock
{
    readonly ModuleList<ResnetBlock2D> _resnets;
    readonly ModuleList<Downsample2D>? _downsamplers;

    public DownBlock2D(UNetConfig c, int level, int inCh, int outCh, bool addDownsample, Device? device, ScalarType? dtype) : base(nameof(DownBlock2D))
    {
        _resnets = Resnets(c, level, inCh, outCh, device, dtype);
        register_module("resnets", _resnets);
        _downsamplers = Downsamplers(c, outCh, addDownsample, device, dtype);
    }

    public override DownBlockOutput forward(Tensor h, Tensor temb, Tensor ehs) => Run(h, temb, ehs, _resnets, null, _downsamplers);
}

/// <summary>diffusers CrossAttnDownBlock2D: <c>resnets.j</c> each followed by <c>attentions.j</c> (Transformer2DModel), optional <c>downsamplers.0</c>.</summary>
public sealed class CrossAttnDownBlock2D : UNetDownBlock
{
    readonly ModuleList<ResnetBlock2D> _resnets;
    readonly ModuleList<Transformer2DModel> _attentions;
    readonly ModuleList<Downsample2D>? _downsamplers;

    public CrossAttnDownBlock2D(UNetConfig c, int level, int inCh, int outCh, bool addDownsample, Device? device, ScalarType? dtype) : base(nameof(CrossAttnDownBlock2D))
    {
        _resnets = Resnets(c, level, inCh, outCh, device, dtype);
        _attentions = BlockAttentions.Create(c, level, outCh, _resnets.Count, device, dtype);
        register_module("attentions", _attentions);
        register_module("resnets", _resnets);
        _downsamplers = Downsamplers(c, outCh, addDownsample, device, dtype);
    }

    public override DownBlockOutput forward(Tensor h, Tensor temb, Tensor ehs) => Run(h, temb, ehs, _resnets, _attentions, _downsamplers);
}

/// <summary>diffusers UNetMidBlock2DCrossAttn: <c>resnets.0</c>, then (<c>attentions.k</c>, <c>resnets.k+1</c>).</summary>
public sealed class UNetMidBlock2DCrossAttn : nn.Module<Tensor, Tensor, Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly ModuleList<ResnetBlock2D> _resnets;
    readonly ModuleList<Transformer2DModel> _attentions;

    public UNetMidBlock2DCrossAttn(UNetConfig c, Device? device, ScalarType? dtype) : base(nameof(UNetMidBlock2DCrossAttn))
    {
        int ch = c.BlockOutChannels[^1];
        _attentions = nn.ModuleList(new Transformer2DModel(c, ch, c.AttentionHeads[^1], c.TransformerLayersPerBlock[^1], device, dtype));
        _resnets = nn.ModuleList(
            new ResnetBlock2D(ch, ch, c.TimeEmbedDim, c.NormNumGroups, c.NormEps, c.MidBlockScaleFactor, device, dtype),
            new ResnetBlock2D(ch, ch, c.TimeEmbedDim, c.NormNumGroups, c.NormEps, c.MidBlockScaleFactor, device, dtype));
        register_module("attentions", _attentions);
        register_module("resnets", _resnets);
    }

    public override Tensor forward(Tensor h, Tensor temb, Tensor ehs)
    {
        h = _resnets[0].call(h, temb);
        for (int k = 0; k < _attentions.Count; k++)
        {
            h = _attentions[k].call(h, ehs);
            h = _resnets[k + 1].call(h, temb);
        }
        return h;
    }
}

/// <summary>diffusers UpBlock2D: layers_per_block + 1 <c>resnets</c> over concatenated skips, optional <c>upsamplers.0</c>.</summary>
public sealed class UpBlock2D : UNetUpBlock
{
    readonly ModuleList<ResnetBlock2D> _resnets;
    readonly ModuleList<Upsample2D>? _upsamplers;

    public UpBlock2D(UNetConfig c, int level, int inCh, int outCh, int prevOutCh, bool addUpsample, Device? device, ScalarType? dtype) : base(nameof(UpBlock2D))
    {
        _resnets = Resnets(c, level, inCh, outCh, prevOutCh, device, dtype);
        register_module("resnets", _resnets);
        _upsamplers = Upsamplers(outCh, addUpsample, device, dtype);
    }

    public override int ResnetCount => _resnets.Count;

    public override Tensor forward(Tensor h, UpBlockContext ctx) => Run(h, ctx, _resnets, null, _upsamplers);
}

/// <summary>diffusers CrossAttnUpBlock2D: <c>resnets.j</c> (over concatenated skips) each followed by <c>attentions.j</c>, optional <c>upsamplers.0</c>.</summary>
public sealed class CrossAttnUpBlock2D : UNetUpBlock
{
    readonly ModuleList<ResnetBlock2D> _resnets;
    readonly ModuleList<Transformer2DModel> _attentions;
    readonly ModuleList<Upsample2D>? _upsamplers;

    public CrossAttnUpBlock2D(UNetConfig c, int level, int inCh, int outCh, int prevOutCh, bool addUpsample, Device? device, ScalarType? dtype) : base(nameof(CrossAttnUpBlock2D))
    {
        _resnets = Resnets(c, level, inCh, outCh, prevOutCh, device, dtype);
        _attentions = BlockAttentions.Create(c, level, outCh, _resnets.Count, device, dtype);
        register_module("attentions", _attentions);
        register_module("resnets", _resnets);
        _upsamplers = Upsamplers(outCh, addUpsample, device, dtype);
    }

    public override int ResnetCount => _resnets.Count;

    public override Tensor forward(Tensor h, UpBlockContext ctx) => Run(h, ctx, _resnets, _attentions, _upsamplers);
}

/// <summary>
/// diffusers Transformer2DModel (continuous input): GroupNorm (eps 1e-6) <c>norm</c>, <c>proj_in</c> (1×1 conv, or
/// Linear with use_linear_projection), <c>transformer_blocks</c>, <c>proj_out</c>, plus the input.
/// </summary>
public sealed class Transformer2DModel : nn.Module<Tensor, Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly GroupNorm _norm;
    readonly nn.Module<Tensor, Tensor> _projIn, _projOut;
    readonly ModuleList<BasicTransformerBlock> _blocks;
    readonly bool _linear;
    readonly long _inner;

    public Transformer2DModel(UNetConfig c, int channels, int heads, int layers, Device? device, ScalarType? dtype) : base(nameof(Transformer2DModel))
    {
        _linear = c.UseLinearProjection;
        int headDim = channels / heads;
        _inner = (long)heads * headDim;
        _norm = Layers.GroupNorm(c.NormNumGroups, channels, 1e-6, device: device, dtype: dtype);
        _projIn = _linear ? nn.Linear(channels, _inner, device: device, dtype: dtype) : nn.Conv2d(channels, _inner, 1, device: device, dtype: dtype);
        _blocks = nn.ModuleList(Enumerable.Range(0, layers)
            .Select(_ => new BasicTransformerBlock(_inner, heads, headDim, c.CrossAttentionDim, c.UpcastAttention, device, dtype)).ToArray());
        _projOut = _linear ? nn.Linear(_inner, channels, device: device, dtype: dtype) : nn.Conv2d(_inner, channels, 1, device: device, dtype: dtype);
        register_module("norm", _norm);
        register_module("proj_in", _projIn);
        register_module("transformer_blocks", _blocks);
        register_module("proj_out", _projOut);
    }

    public override Tensor forward(Tensor x, Tensor ehs)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], ch = x.shape[1], height = x.shape[2], width = x.shape[3];
        var h = _norm.call(x);
        if (_linear)
            h = _projIn.call(h.permute(0, 2, 3, 1).reshape(b, height * width, ch));
        else
            h = _projIn.call(h).permute(0, 2, 3, 1).reshape(b, height * width, _inner);
        foreach (var block in _blocks)
            h = block.call(h, ehs);
        if (_linear)
            h = _projOut.call(h).reshape(b, height, width, ch).permute(0, 3, 1, 2);
        else
            h = _projOut.call(h.reshape(b, height, width, _inner).permute(0, 3, 1, 2));
        return (h + x).MoveToOuterDisposeScope();
    }
}

/// <summary>diffusers BasicTransformerBlock: norm1 → attn1 (self), norm2 → attn2 (cross), norm3 → ff (GEGLU), each residual.</summary>
public sealed class BasicTransformerBlock : nn.Module<Tensor, Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly LayerNorm _norm1, _norm2, _norm3;
    readonly CrossAttention _attn1, _attn2;
    readonly FeedForward _ff;

    public BasicTransformerBlock(long dim, int heads, int headDim, long crossAttentionDim, bool upcast, Device? device, ScalarType? dtype) : base(nameof(BasicTransformerBlock))
    {
        _norm1 = Layers.LayerNorm(dim, 1e-5, device: device, dtype: dtype);
        _attn1 = new CrossAttention(dim, dim, heads, headDim, upcast, device, dtype);
        _norm2 = Layers.LayerNorm(dim, 1e-5, device: device, dtype: dtype);
        _attn2 = new CrossAttention(dim, crossAttentionDim, heads, headDim, upcast, device, dtype);
        _norm3 = Layers.LayerNorm(dim, 1e-5, device: device, dtype: dtype);
        _ff = new FeedForward(dim, dim * 4, device, dtype);
        register_module("norm1", _norm1);
        register_module("attn1", _attn1);
        register_module("norm2", _norm2);
        register_module("attn2", _attn2);
        register_module("norm3", _norm3);
        register_module("ff", _ff);
    }

    public override Tensor forward(Tensor h, Tensor ehs)
    {
        using var scope = NewDisposeScope();
        var n1 = _norm1.call(h);
        h = h + _attn1.call(n1, n1);
        h = h + _attn2.call(_norm2.call(h), ehs);
        h = h + _ff.call(_norm3.call(h));
        return h.MoveToOuterDisposeScope();
    }
}

/// <summary>diffusers Attention as the UNet uses it: bias-free <c>to_q/to_k/to_v</c>, <c>to_out.0</c> with bias, scale head_dim^-0.5.</summary>
public sealed class CrossAttention : nn.Module<Tensor, Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly Linear _q, _k, _v;
    readonly ModuleList<nn.Module<Tensor, Tensor>> _out;
    readonly int _heads, _headDim;

    readonly bool _upcast;

    public CrossAttention(long queryDim, long contextDim, int heads, int headDim, bool upcast, Device? device, ScalarType? dtype) : base(nameof(CrossAttention))
    {
        _upcast = upcast;
        _heads = heads;
        _headDim = headDim;
        long inner = (long)heads * headDim;
        _q = nn.Linear(queryDim, inner, hasBias: false, device: device, dtype: dtype);
        _k = nn.Linear(contextDim, inner, hasBias: false, device: device, dtype: dtype);
        _v = nn.Linear(contextDim, inner, hasBias: false, device: device, dtype: dtype);
        _out = nn.ModuleList<nn.Module<Tensor, Tensor>>(nn.Linear(inner, queryDim, device: device, dtype: dtype), nn.Dropout(0.0));
        register_module("to_q", _q);
        register_module("to_k", _k);
        register_module("to_v", _v);
        register_module("to_out", _out);
    }

    public override Tensor forward(Tensor x, Tensor context)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0];
        Tensor Heads(Tensor y) => y.view(b, -1, _heads, _headDim).transpose(1, 2);
        var q = Heads(_q.call(x));
        var k = Heads(_k.call(context));
        var v = Heads(_v.call(context));
        Tensor a;
        if (_upcast && q.dtype is ScalarType.Float16 or ScalarType.BFloat16)
            a = nn.functional.scaled_dot_product_attention(q.to_type(ScalarType.Float32), k.to_type(ScalarType.Float32), v.to_type(ScalarType.Float32)).to_type(q.dtype);
        else
            a = nn.functional.scaled_dot_product_attention(q, k, v);
        var o = a.transpose(1, 2).reshape(b, -1, (long)_heads * _headDim);
        foreach (var m in _out) o = m.call(o);
        return o.MoveToOuterDisposeScope();
    }
}

/// <summary>diffusers FeedForward with GEGLU: <c>net.0</c> = GEGLU (<c>proj</c> to 2×inner; value · gelu(gate)), <c>net.1</c> dropout, <c>net.2</c> Linear.</summary>
public sealed class FeedForward : nn.Module<Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly ModuleList<nn.Module<Tensor, Tensor>> _net;

    public FeedForward(long dim, long inner, Device? device, ScalarType? dtype) : base(nameof(FeedForward))
    {
        _net = nn.ModuleList<nn.Module<Tensor, Tensor>>(new GEGLU(dim, inner, device, dtype), nn.Dropout(0.0), nn.Linear(inner, dim, device: device, dtype: dtype));
        register_module("net", _net);
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var h = x;
        foreach (var m in _net) h = m.call(h);
        return h.MoveToOuterDisposeScope();
    }
}

/// <summary>GEGLU: <c>proj</c> Linear(dim, 2·inner), split into value and gate, value · gelu(gate).</summary>
public sealed class GEGLU : nn.Module<Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly Linear _proj;

    public GEGLU(long dim, long inner, Device? device, ScalarType? dtype) : base(nameof(GEGLU))
    {
        _proj = nn.Linear(dim, inner * 2, device: device, dtype: dtype);
        register_module("proj", _proj);
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var parts = _proj.call(x).chunk(2, -1);
        return (parts[0] * nn.functional.gelu(parts[1])).MoveToOuterDisposeScope();
    }
}
