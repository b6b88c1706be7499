using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Models.StableDiffusion;

/// <summary>Configuration of diffusers' AutoencoderKL (<c>vae/config.json</c>).</summary>
public sealed record VaeConfig
{
    public int InChannels { get; init; } = 3;
    public int OutChannels { get; init; } = 3;
    public int LatentChannels { get; init; } = 4;
    public int[] BlockOutChannels { get; init; } = [128, 256, 512, 512];
    public int LayersPerBlock { get; init; } = 2;
    public int NormNumGroups { get; init; } = 32;
    /// <summary>Latents the UNet sees = encoder sample × ScalingFactor (0.18215 SD1/2, 0.13025 SDXL).</summary>
    public double ScalingFactor { get; init; } = 0.18215;
    public double? ShiftFactor { get; init; }
    public bool MidBlockAddAttention { get; init; } = true;
    public bool UseQuantConv { get; init; } = true;
    public bool UsePostQuantConv { get; init; } = true;
    public int SampleSize { get; init; } = 512;

    /// <summary>diffusers' <c>vae/config.json</c> for this config.</summary>
    public string ToJson() => DiffusersJson.Write(new Dictionary<string, object?>
    {
        ["_class_name"] = "AutoencoderKL",
        ["_diffusers_version"] = DiffusersJson.DiffusersVersion,
        ["act_fn"] = "silu",
        ["block_out_channels"] = BlockOutChannels,
        ["down_block_types"] = Enumerable.Repeat("DownEncoderBlock2D", BlockOutChannels.Length).ToArray(),
        ["force_upcast"] = true,
        ["in_channels"] = InChannels,
        ["latent_channels"] = LatentChannels,
        ["layers_per_block"] = LayersPerBlock,
        ["mid_block_add_attention"] = MidBlockAddAttention,
        ["norm_num_groups"] = NormNumGroups,
        ["out_channels"] = OutChannels,
        ["sample_size"] = SampleSize,
        ["scaling_factor"] = ScalingFactor,
        ["shift_factor"] = ShiftFactor,
        ["up_block_types"] = Enumerable.Repeat("UpDecoderBlock2D", BlockOutChannels.Length).ToArray(),
        ["use_post_quant_conv"] = UsePostQuantConv,
        ["use_quant_conv"] = UseQuantConv,
    });

    public static VaeConfig FromJsonFile(string path)
    {
        using var doc = DiffusersJson.Parse(path);
        var r = doc.RootElement;
        var boc = DiffusersJson.Ints(r, "block_out_channels", [64]);
        foreach (var t in DiffusersJson.Strings(r, "down_block_types", []))
            if (t != "DownEncoderBlock2D") throw new LoraSharpException($"VAE down block type '{t}' is not supported (DownEncoderBlock2D)", path, "down_block_types");
        foreach (var t in DiffusersJson.Strings(r, "up_block_types", []))
            if (t != "UpDecoderBlock2D") throw new LoraSharpException($"VAE up block type '{t}' is not supported (UpDecoderBlock2D)", path, "up_block_types");
        if (DiffusersJson.String(r, "act_fn", "silu") != "silu")
            throw new LoraSharpException("VAE act_fn must be silu", path, "act_fn");
        return new VaeConfig
        {
            InChannels = DiffusersJson.Int(r, "in_channels", 3),
            OutChannels = DiffusersJson.Int(r, "out_channels", 3),
            LatentChannels = DiffusersJson.Int(r, "latent_channels", 4),
            BlockOutChannels = boc,
            LayersPerBlock = DiffusersJson.Int(r, "layers_per_block", 1),
            NormNumGroups = DiffusersJson.Int(r, "norm_num_groups", 32),
            ScalingFactor = DiffusersJson.Double(r, "scaling_factor", 0.18215),
            ShiftFactor = r.TryGetProperty("shift_factor", out var s) && s.ValueKind == System.Text.Json.JsonValueKind.Number ? s.GetDouble() : null,
            MidBlockAddAttention = DiffusersJson.Bool(r, "mid_block_add_attention", true),
            UseQuantConv = DiffusersJson.Bool(r, "use_quant_conv", true),
            UsePostQuantConv = DiffusersJson.Bool(r, "use_post_quant_conv", true),
            SampleSize = DiffusersJson.Int(r, "sample_size", 32),
        };
    }
}

/// <summary>The encoder's diagonal Gaussian over latents: logvar clamped to [−30, 20] as diffusers does.</summary>
public sealed class DiagonalGaussian : IDisposable
{
    public Tensor Mean { get; }
    public Tensor LogVar { get; }
    public Tensor Std { get; }

    public DiagonalGaussian(Tensor moments)
    {
        using var scope = NewDisposeScope();
        var parts = moments.chunk(2, 1);
        Mean = parts[0].contiguous().MoveToOuterDisposeScope();
        LogVar = parts[1].clamp(-30.0, 20.0).MoveToOuterDisposeScope();
        Std = (LogVar * 0.5).exp().MoveToOuterDisposeScope();
    }

    /// <summary>mean + std · ε with ε from <paramref name="generator"/> (or the global one).</summary>
    public Tensor Sample(Generator? generator = null)
    {
        using var scope = NewDisposeScope();
        var eps = randn(Mean.shape, dtype: Mean.dtype, device: Mean.device, generator: generator);
        return (Mean + Std * eps).MoveToOuterDisposeScope();
    }

    public void Dispose()
    {
        Mean.Dispose();
        LogVar.Dispose();
        Std.Dispose();
    }
}

/// <summary>
/// diffusers AutoencoderKL: <c>encoder</c> → <c>quant_conv</c> → Gaussian moments; latents → <c>post_quant_conv</c>
/// → <c>decoder</c>. <see cref="Encode"/> and <see cref="Decode"/> do not apply the scaling factor; the pipeline
/// multiplies encoded latents by <see cref="VaeConfig.ScalingFactor"/> and divides before decoding.
/// </summary>
public sealed class AutoencoderKL : nn.Module<Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    public VaeConfig Config { get; }
    readonly VaeEncoder _encoder;
    readonly VaeDecoder _decoder;
    readonly Conv2d? _quantConv, _postQuantConv;

    public AutoencoderKL(VaeConfig config, Device? device = null, ScalarType? dtype = null) : base(nameof(AutoencoderKL))
    {
        Config = config;
        _encoder = new VaeEncoder(config, device, dtype);
        _decoder = new VaeDecoder(config, device, dtype);
        register_module("encoder", _encoder);
        register_module("decoder", _decoder);
        long l2 = 2L * config.LatentChannels;
        if (config.UseQuantConv)
        {
            _quantConv = nn.Conv2d(l2, l2, 1, device: device, dtype: dtype);
            register_module("quant_conv", _quantConv);
        }
        if (config.UsePostQuantConv)
        {
            _postQuantConv = nn.Conv2d(config.LatentChannels, config.LatentChannels, 1, device: device, dtype: dtype);
            register_module("post_quant_conv", _postQuantConv);
        }
    }

    /// <summary>The parameters' dtype; inputs are converted to it.</summary>
    public ScalarType DType => _decoder.parameters().First().dtype;

    /// <summary>Image [B, 3, H, W] in [−1, 1] → latent distribution at H/8 × W/8.</summary>
    public DiagonalGaussian Encode(Tensor image)
    {
        Tensor moments;
        using (var scope = NewDisposeScope())
        {
            var h = _encoder.call(image.to_type(DType));
            if (_quantConv is not null) h = _quantConv.call(h);
            moments = h.MoveToOuterDisposeScope();
        }
        using (moments)
            return new DiagonalGaussian(moments);
    }

    /// <summary>Latents (unscaled) → image in about [−1, 1].</summary>
    public Tensor Decode(Tensor latents)
    {
        using var scope = NewDisposeScope();
        var z = latents.to_type(DType);
        if (_postQuantConv is not null) z = _postQuantConv.call(z);
        return _decoder.call(z).MoveToOuterDisposeScope();
    }

    /// <summary>Reconstruction through the mean of the latent distribution.</summary>
    public override Tensor forward(Tensor image)
    {
        using var scope = NewDisposeScope();
        using var dist = Encode(image);
        return Decode(dist.Mean).MoveToOuterDisposeScope();
    }
}

/// <summary>diffusers Encoder: conv_in, down_blocks (DownEncoderBlock2D), mid_block, conv_norm_out → SiLU → conv_out (2×latent channels).</summary>
sealed class VaeEncoder : nn.Module<Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly Conv2d _convIn, _convOut;
    readonly ModuleList<DownEncoderBlock2D> _downBlocks;
    readonly VaeMidBlock _midBlock;
    readonly GroupNorm _convNormOut;

    public VaeEncoder(VaeConfig c, Device? device, ScalarType? dtype) : base("encoder")
    {
        var boc = c.BlockOutChannels;
        _convIn = nn.Conv2d(c.InChannels, boc[0], 3, padding: 1, device: device, dtype: dtype);
        var blocks = new List<DownEncoderBlock2D>();
        int outCh = boc[0];
        for (int i = 0; i < boc.Length; i++)
        {
            int inCh = outCh;
            outCh = boc[i];
            blocks.Add(new DownEncoderBlock2D(c, inCh, outCh, addDownsample: i != boc.Length - 1, device, dtype));
        }
        _downBlocks = nn.ModuleList(blocks.ToArray());
        _midBlock = new VaeMidBlock(c, boc[^1], device, dtype);
        _convNormOut = Layers.GroupNorm(c.NormNumGroups, boc[^1], 1e-6, device: device, dtype: dtype);
        _convOut = nn.Conv2d(boc[^1], 2L * c.LatentChannels, 3, padding: 1, device: device, dtype: dtype);
        register_module("conv_in", _convIn);
        register_module("down_blocks", _downBlocks);
        register_module("mid_block", _midBlock);
        register_module("conv_norm_out", _convNormOut);
        register_module("conv_out", _convOut);
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var h = _convIn.call(x);
        foreach (var block in _downBlocks) h = block.call(h);
        h = _midBlock.call(h);
        h = _convOut.call(nn.functional.silu(_convNormOut.call(h)));
        return h.MoveToOuterDisposeScope();
    }
}

/// <summary>diffusers Decoder: conv_in, mid_block, up_blocks (UpDecoderBlock2D, widest first), conv_norm_out → SiLU → conv_out.</summary>
sealed class VaeDecoder : nn.Module<Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly Conv2d _convIn, _convOut;
    readonly VaeMidBlock _midBlock;
    readonly ModuleList<UpDecoderBlock2D> _upBlocks;
    readonly GroupNorm _convNormOut;

    public VaeDecoder(VaeConfig c, Device? device, ScalarType? dtype) : base("decoder")
    {
        var rev = c.BlockOutChannels.Reverse().ToArray();
        _convIn = nn.Conv2d(c.LatentChannels, rev[0], 3, padding: 1, device: device, dtype: dtype);
        _midBlock = new VaeMidBlock(c, rev[0], device, dtype);
        var blocks = new List<UpDecoderBlock2D>();
        int outCh = rev[0];
        for (int i = 0; i < rev.Length; i++)
        {
            int prev = outCh;
            outCh = rev[i];
            blocks.Add(new UpDecoderBlock2D(c, prev, outCh, addUpsample: i != rev.Length - 1, device, dtype));
        }
        _upBlocks = nn.ModuleList(blocks.ToArray());
        _convNormOut = Layers.GroupNorm(c.NormNumGroups, c.BlockOutChannels[0], 1e-6, device: device, dtype: dtype);
        _convOut = nn.Conv2d(c.BlockOutChannels[0], c.OutChannels, 3, padding: 1, device: device, dtype: dtype);
        register_module("conv_in", _convIn);
        register_module("mid_block", _midBlock);
        register_module("up_blocks", _upBlocks);
        register_module("conv_norm_out", _convNormOut);
        register_module("conv_out", _convOut);
    }

    public override Tensor forward(Tensor z)
    {
        using var scope = NewDisposeScope();
        var h = _convIn.call(z);
        h = _midBlock.call(h);
        foreach (var block in _upBlocks) h = block.call(h);
        h = _convOut.call(nn.functional.silu(_convNormOut.call(h)));
        return h.MoveToOuterDisposeScope();
    }
}

/// <summary>diffusers DownEncoderBlock2D: <c>resnets</c> (no time embedding, eps 1e-6), optional <c>downsamplers.0</c> (padding 0).</summary>
sealed class DownEncoderBlock2D : nn.Module<Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly ModuleList<ResnetBlock2D> _resnets;
    readonly ModuleList<Downsample2D>? _downsamplers;

    public DownEncoderBlock2D(VaeConfig c, int inCh, int outCh, bool addDownsample, Device? device, ScalarType? dtype) : base(nameof(DownEncoderBlock2D))
    {
        _resnets = nn.ModuleList(Enumerable.Range(0, c.LayersPerBlock)
            .Select(j => new ResnetBlock2D(j == 0 ? inCh : outCh, outCh, null, c.NormNumGroups, 1e-6, 1.0, device, dtype)).ToArray());
        register_module("resnets", _resnets);
        if (addDownsample)
        {
            _downsamplers = nn.ModuleList(new Downsample2D(outCh, outCh, 0, device, dtype));
            register_module("downsamplers", _downsamplers);
        }
    }

    public override Tensor forward(Tensor h)
    {
        using var scope = NewDisposeScope();
        foreach (var r in _resnets) h = r.call(h, null);
        if (_downsamplers is not null) h = _downsamplers[0].call(h);
        return h.MoveToOuterDisposeScope();
    }
}

/// <summary>diffusers UpDecoderBlock2D: layers_per_block + 1 <c>resnets</c>, optional <c>upsamplers.0</c>.</summary>
sealed class UpDecoderBlock2D : nn.Module<Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly ModuleList<ResnetBlock2D> _resnets;
    readonly ModuleList<Upsample2D>? _upsamplers;

    public UpDecoderBlock2D(VaeConfig c, int inCh, int outCh, bool addUpsample, Device? device, ScalarType? dtype) : base(nameof(UpDecoderBlock2D))
    {
        _resnets = nn.ModuleList(Enumerable.Range(0, c.LayersPerBlock + 1)
            .Select(j => new ResnetBlock2D(j == 0 ? inCh : outCh, outCh, null, c.NormNumGroups, 1e-6, 1.0, device, dtype)).ToArray());
        register_module("resnets", _resnets);
        if (addUpsample)
        {
            _upsamplers = nn.ModuleList(new Upsample2D(outCh, outCh, device, dtype));
            register_module("upsamplers", _upsamplers);
        }
    }

    public override Tensor forward(Tensor h)
    {
        using var scope = NewDisposeScope();
        foreach (var r in _resnets) h = r.call(h, null);
        if (_upsamplers is not null) h = _upsamplers[0].call(h, null);
        return h.MoveToOuterDisposeScope();
    }
}

/// <summary>diffusers UNetMidBlock2D as the VAE uses it: <c>resnets.0</c>, <c>attentions.0</c> (single-head spatial attention), <c>resnets.1</c>.</summary>
sealed class VaeMidBlock : nn.Module<Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly ModuleList<ResnetBlock2D> _resnets;
    readonly ModuleList<VaeAttention>? _attentions;

    public VaeMidBlock(VaeConfig c, int ch, Device? device, ScalarType? dtype) : base("mid_block")
    {
        if (c.MidBlockAddAttention)
        {
            _attentions = nn.ModuleList(new VaeAttention(ch, c.NormNumGroups, device, dtype));
            register_module("attentions", _attentions);
        }
        _resnets = nn.ModuleList(
            new ResnetBlock2D(ch, ch, null, c.NormNumGroups, 1e-6, 1.0, device, dtype),
            new ResnetBlock2D(ch, ch, null, c.NormNumGroups, 1e-6, 1.0, device, dtype));
        register_module("resnets", _resnets);
    }

    public override Tensor forward(Tensor h)
    {
        using var scope = NewDisposeScope();
        h = _resnets[0].call(h, null);
        if (_attentions is not null) h = _attentions[0].call(h);
        h = _resnets[1].call(h, null);
        return h.MoveToOuterDisposeScope();
    }
}

/// <summary>
/// diffusers Attention over spatial positions (the VAE mid block): <c>group_norm</c> (eps 1e-6), <c>to_q/to_k/to_v</c>
/// and <c>to_out.0</c> Linear with bias, one head of width C, plus the input.
/// </summary>
sealed class VaeAttention : nn.Module<Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly GroupNorm _groupNorm;
    readonly Linear _q, _k, _v;
    readonly ModuleList<nn.Module<Tensor, Tensor>> _out;

    public VaeAttention(int ch, int groups, Device? device, ScalarType? dtype) : base("attention")
    {
        _groupNorm = Layers.GroupNorm(groups, ch, 1e-6, device: device, dtype: dtype);
        _q = nn.Linear(ch, ch, device: device, dtype: dtype);
        _k = nn.Linear(ch, ch, device: device, dtype: dtype);
        _v = nn.Linear(ch, ch, device: device, dtype: dtype);
        _out = nn.ModuleList<nn.Module<Tensor, Tensor>>(nn.Linear(ch, ch, device: device, dtype: dtype), nn.Dropout(0.0));
        register_module("group_norm", _groupNorm);
        register_module("to_q", _q);
        register_module("to_k", _k);
        register_module("to_v", _v);
        register_module("to_out", _out);
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], c = x.shape[1], height = x.shape[2], width = x.shape[3];
        var h = _groupNorm.call(x).view(b, c, height * width).transpose(1, 2);
        var q = _q.call(h).unsqueeze(1);
        var k = _k.call(h).unsqueeze(1);
        var v = _v.call(h).unsqueeze(1);
        var a = nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1);
        foreach (var m in _out) a = m.call(a);
        var output = a.transpose(1, 2).reshape(b, c, height, width) + x;
        return output.MoveToOuterDisposeScope();
    }
}
