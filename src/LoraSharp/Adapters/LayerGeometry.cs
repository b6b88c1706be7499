using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Adapters;

/// <summary>Which kind of base layer an adapter sits on.</summary>
public enum LayerKind
{
    Linear,
    Conv2d,
}

/// <summary>
/// The shape and convolution settings of a base layer: everything the adapter math needs to know about it.
/// Weight layout is <c>[out, in]</c> (Linear) or <c>[out, in, kh, kw]</c> (Conv2d, groups = 1).
/// </summary>
public sealed class LayerGeometry
{
    public LayerKind Kind { get; }
    public long OutFeatures { get; }
    public long InFeatures { get; }
    /// <summary>Kernel size [kh, kw]; [] for Linear.</summary>
    public long[] KernelSize { get; }
    public long[] Stride { get; }
    public long[] Padding { get; }
    public long[] Dilation { get; }

    LayerGeometry(LayerKind kind, long outF, long inF, long[] kernel, long[] stride, long[] padding, long[] dilation)
    {
        if (outF <= 0 || inF <= 0) throw new ArgumentException($"Layer sizes must be positive (out {outF}, in {inF}).");
        Kind = kind; OutFeatures = outF; InFeatures = inF;
        KernelSize = kernel; Stride = stride; Padding = padding; Dilation = dilation;
    }

    public static LayerGeometry Linear(long inFeatures, long outFeatures) =>
        new(LayerKind.Linear, outFeatures, inFeatures, [], [], [], []);

    public static LayerGeometry Conv2d(long inChannels, long outChannels, long[] kernelSize,
        long[]? stride = null, long[]? padding = null, long[]? dilation = null)
    {
        if (kernelSize.Length != 2) throw new ArgumentException("Conv2d kernel size must have two entries.", nameof(kernelSize));
        return new(LayerKind.Conv2d, outChannels, inChannels, [.. kernelSize], Pair(stride, 1), Pair(padding, 0), Pair(dilation, 1));
    }

    static long[] Pair(long[]? v, long dflt) => v switch
    {
        null or [] => [dflt, dflt],
        [var a] => [a, a],
        [var a, var b] => [a, b],
        _ => throw new ArgumentException("Conv2d settings must have one or two entries."),
    };

    /// <summary>The geometry of a TorchSharp Linear or Conv2d module; other module types are not adaptable.</summary>
    public static LayerGeometry Of(nn.Module module, string path = "")
    {
        switch (module)
        {
            case Linear lin:
                return Linear(lin.in_features, lin.out_features);
            case Conv2d conv:
                if (conv.groups != 1)
                    throw new NotSupportedException($"Module '{path}': grouped Conv2d (groups={conv.groups}) cannot carry an adapter.");
                if (conv.padding_mode != PaddingModes.Zeros)
                    throw new NotSupportedException($"Module '{path}': Conv2d padding mode {conv.padding_mode} is not supported (zeros only).");
                var k = conv.kernel_size;
                long[] pad;
                if (conv.padding_type == TorchSharp.Padding.Same)
                {
                    if (k.Any(x => x % 2 == 0))
                        throw new NotSupportedException($"Module '{path}': padding 'same' with an even kernel is not supported.");
                    var d = Pair(conv.dilation, 1);
                    pad = [d[0] * (k[0] - 1) / 2, d[1] * (k[1] - 1) / 2];
                }
                else if (conv.padding_type == TorchSharp.Padding.Valid) pad = [0, 0];
                else pad = Pair(conv.padding, 0);
                return Conv2d(conv.in_channels, conv.out_channels, k, conv.stride, pad, conv.dilation);
            default:
                throw new NotSupportedException($"Module '{path}' is a {module.GetType().Name}; adapters attach to Linear and Conv2d only.");
        }
    }

    public bool IsConv => Kind == LayerKind.Conv2d;

    /// <summary>True for a Conv2d with a 1×1 kernel (behaves like a Linear over channels).</summary>
    public bool IsPointwise => IsConv && KernelSize[0] == 1 && KernelSize[1] == 1;

    /// <summary>Kernel element count (1 for Linear).</summary>
    public long KernelNumel => IsConv ? KernelSize[0] * KernelSize[1] : 1;

    /// <summary>in · kh · kw: the fan-in of the layer and the column count of its weight as a matrix.</summary>
    public long FanIn => InFeatures * KernelNumel;

    public long[] WeightShape => IsConv ? [OutFeatures, InFeatures, KernelSize[0], KernelSize[1]] : [OutFeatures, InFeatures];

    /// <summary>The layer's operation with the given weight (and optional bias): F.linear or F.conv2d with this geometry.</summary>
    public Tensor Apply(Tensor x, Tensor weight, Tensor? bias = null) => IsConv
        ? nn.functional.conv2d(x, weight, bias, Stride, Padding, Dilation, 1)
        : nn.functional.linear(x, weight, bias);

    /// <summary>Shape to broadcast a per-output-channel vector against this layer's output.</summary>
    public long[] OutputBroadcastShape(long outputRank) => IsConv ? [1, OutFeatures, 1, 1] : [.. Enumerable.Repeat(1L, (int)outputRank - 1), OutFeatures];

    public override string ToString() => IsConv
        ? $"Conv2d({InFeatures}→{OutFeatures}, k={KernelSize[0]}×{KernelSize[1]}, s={Stride[0]}, p={Padding[0]}, d={Dilation[0]})"
        : $"Linear({InFeatures}→{OutFeatures})";
}
