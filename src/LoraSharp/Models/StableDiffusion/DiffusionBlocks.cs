using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Models.StableDiffusion;

// The building blocks the UNet and the VAE share, as diffusers' resnet.py / downsampling.py /
// upsampling.py / embeddings.py define them (parameter names equal diffusers').

/// <summary>Norm layers with PyTorch's initial values (TorchSharp 0.107's GroupNorm leaves weight and bias uninitialised).</summary>
static class Layers
{
    public static GroupNorm GroupNorm(long groups, long channels, double eps, Device? device = null, ScalarType? dtype = null)
    {
        var norm = nn.GroupNorm(groups, channels, eps, device: device, dtype: dtype);
        Reset(norm.weight, norm.bias);
        return norm;
    }

    public static LayerNorm LayerNorm(long dim, double eps, Device? device = null, ScalarType? dtype = null)
    {
        var norm = nn.LayerNorm(dim, eps, device: device, dtype: dtype);
        Reset(norm.weight, norm.bias);
        return norm;
    }

    static void Reset(Tensor? weight, Tensor? bias)
    {
        using var noGrad = no_grad();
        weight?.fill_(1.0);
        bias?.zero_();
    }
}

/// <summary>
/// diffusers ResnetBlock2D (time_embedding_norm "default", pre-norm): norm1 → SiLU → conv1 (+ time_emb_proj(SiLU(temb)))
/// → norm2 → SiLU → conv2, plus the input (through a 1×1 <c>conv_shortcut</c> when the width changes), divided by
/// the output scale factor. Without temb channels (the VAE) there is no <c>time_emb_proj</c>.
/// </summary>
public sealed class ResnetBlock2D : nn.Module<Tensor, Tensor?, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly GroupNorm _norm1, _norm2;
    readonly Conv2d _conv1, _conv2;
    readonly Linear? _timeEmbProj;
    readonly Conv2d? _convShortcut;
    readonly double _outputScaleFactor;

    public ResnetBlock2D(long inChannels, long outChannels, long? tembChannels, int groups, double eps,
        double outputScaleFactor = 1.0, Device? device = null, ScalarType? dtype = null) : base(nameof(ResnetBlock2D))
    {
        _outputScaleFactor = outputScaleFactor;
        _norm1 = Layers.GroupNorm(groups, inChannels, eps, device: device, dtype: dtype);
        _conv1 = nn.Conv2d(inChannels, outChannels, 3, padding: 1, device: device, dtype: dtype);
        register_module("norm1", _norm1);
        register_module("conv1", _conv1);
        if (tembChannels is long t)
        {
            _timeEmbProj = nn.Linear(t, outChannels, device: device, dtype: dtype);
            register_module("time_emb_proj", _timeEmbProj);
        }
        _norm2 = Layers.GroupNorm(groups, outChannels, eps, device: device, dtype: dtype);
        _conv2 = nn.Conv2d(outChannels, outChannels, 3, padding: 1, device: device, dtype: dtype);
        register_module("norm2", _norm2);
        register_module("conv2", _conv2);
        if (inChannels != outChannels)
        {
            _convShortcut = nn.Conv2d(inChannels, outChannels, 1, device: device, dtype: dtype);
            register_module("conv_shortcut", _convShortcut);
        }
    }

    public override Tensor forward(Tensor x, Tensor? temb)
    {
        using var scope = NewDisposeScope();
        var h = _conv1.call(nn.functional.silu(_norm1.call(x)));
        if (_timeEmbProj is not null)
        {
            if (temb is null) throw new ArgumentNullException(nameof(temb), "this ResnetBlock2D needs a time embedding");
            h = h + _timeEmbProj.call(nn.functional.silu(temb)).unsqueeze(-1).unsqueeze(-1);
        }
        h = _conv2.call(nn.functional.silu(_norm2.call(h)));
        var skip = _convShortcut is null ? x : _convShortcut.call(x);
        var output = skip + h;
        if (_outputScaleFactor != 1.0) output = output / _outputScaleFactor;
        return output.MoveToOuterDisposeScope();
    }
}

/// <summary>diffusers Downsample2D with a conv (<c>conv</c>, 3×3 stride 2). Padding 0 (the VAE) pads right/bottom by one first.</summary>
public sealed class Downsample2D : nn.Module<Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly Conv2d _conv;
    readonly bool _asymmetricPad;

    public Downsample2D(long channels, long outChannels, int padding, Device? device = null, ScalarType? dtype = null) : base(nameof(Downsample2D))
    {
        _asymmetricPad = padding == 0;
        _conv = nn.Conv2d(channels, outChannels, 3, stride: 2, padding: padding, device: device, dtype: dtype);
        register_module("conv", _conv);
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var h = _asymmetricPad ? nn.functional.pad(x, [0, 1, 0, 1], PaddingModes.Constant, 0) : x;
        return _conv.call(h).MoveToOuterDisposeScope();
    }
}

/// <summary>diffusers Upsample2D with a conv: nearest-neighbour ×2 (or to the given size), then <c>conv</c> 3×3.</summary>
public sealed class Upsample2D : nn.Module<Tensor, long[]?, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly Conv2d _conv;

    public Upsample2D(long channels, long outChannels, Device? device = null, ScalarType? dtype = null) : base(nameof(Upsample2D))
    {
        _conv = nn.Conv2d(channels, outChannels, 3, padding: 1, device: device, dtype: dtype);
        register_module("conv", _conv);
    }

    public override Tensor forward(Tensor x, long[]? outputSize)
    {
        using var scope = NewDisposeScope();
        var h = outputSize is null
            ? nn.functional.interpolate(x, scale_factor: [2.0, 2.0], mode: InterpolationMode.Nearest)
            : nn.functional.interpolate(x, size: outputSize, mode: InterpolationMode.Nearest);
        return _conv.call(h).MoveToOuterDisposeScope();
    }
}

/// <summary>diffusers TimestepEmbedding: <c>linear_1</c> → SiLU → <c>linear_2</c>.</summary>
public sealed class TimestepEmbedding : nn.Module<Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly Linear _linear1, _linear2;

    public TimestepEmbedding(long inChannels, long timeEmbedDim, Device? device = null, ScalarType? dtype = null) : base(nameof(TimestepEmbedding))
    {
        _linear1 = nn.Linear(inChannels, timeEmbedDim, device: device, dtype: dtype);
        _linear2 = nn.Linear(timeEmbedDim, timeEmbedDim, device: device, dtype: dtype);
        register_module("linear_1", _linear1);
        register_module("linear_2", _linear2);
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        return _linear2.call(nn.functional.silu(_linear1.call(x))).MoveToOuterDisposeScope();
    }
}

/// <summary>diffusers' sinusoidal timestep embedding (get_timestep_embedding), computed in float32.</summary>
public static class TimestepFeatures
{
    /// <summary>
    /// [N] timesteps → [N, dim]: exponents −ln(10000)·k/(dim/2 − shift) for k &lt; dim/2, then [sin, cos]
    /// ([cos, sin] with <paramref name="flipSinToCos"/>), zero-padded when dim is odd.
    /// </summary>
    public static Tensor Sinusoidal(Tensor timesteps, int dim, bool flipSinToCos, double downscaleFreqShift, double maxPeriod = 10000)
    {
        using var scope = NewDisposeScope();
        int half = dim / 2;
        var exponent = -Math.Log(maxPeriod) * arange(0, half, dtype: ScalarType.Float32, device: timesteps.device);
        exponent = exponent / (half - downscaleFreqShift);
        var freqs = exponent.exp();
        var args = timesteps.to_type(ScalarType.Float32).unsqueeze(1) * freqs.unsqueeze(0);
        var emb = cat([args.sin(), args.cos()], -1);
        if (flipSinToCos)
            emb = cat([emb[.., half..], emb[.., ..half]], -1);
        if (dim % 2 == 1)
            emb = nn.functional.pad(emb, [0, 1, 0, 0]);
        return emb.MoveToOuterDisposeScope();
    }
}
