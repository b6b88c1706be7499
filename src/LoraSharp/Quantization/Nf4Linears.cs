using System.Runtime.InteropServices;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Quantization;

/// <summary>
/// Frozen <c>Linear</c> weights of a module tree stored as <see cref="Nf4Tensor"/> (QLoRA), dequantized on the fly.
/// Every quantized Linear's <c>weight</c> becomes one shared, reused buffer per (shape, dtype); a forward pre-hook
/// dequantizes the module's weight into it right before the matmul, and an identity autograd node on the module's
/// output dequantizes it again right before the matmul's backward (the engine runs that node immediately before the
/// Linear's own backward, so the buffer holds this module's weight when the saved weight is read). The full-precision
/// weights are never all resident: the stored bytes are ≈0.516 per parameter plus one buffer per distinct shape.
/// Adapters attach on top as usual (quantize first, then create adapters, so the output is complete before the
/// adapter hooks add their part). Quantized modules are frozen: no gradient reaches their weights.
/// </summary>
public sealed class Nf4Linears : IDisposable
{
    sealed class Entry(string path, Linear module, Nf4Tensor data, Parameter buffer)
    {
        public readonly string Path = path;
        public readonly Linear Module = module;
        public readonly Nf4Tensor Data = data;
        public readonly Parameter Buffer = buffer;
        public IDisposable? Hooks;
    }

    sealed class Handles(Action remove) : IDisposable { public void Dispose() => remove(); }

    readonly List<Entry> _entries = [];
    readonly Dictionary<(long, long, ScalarType), Parameter> _buffers = [];

    /// <summary>Quantized module paths, in tree order.</summary>
    public IReadOnlyList<string> Paths => _entries.Select(e => e.Path).ToList();

    /// <summary>Bytes of every stored NF4 buffer (packed codes, absmax codes and scales).</summary>
    public long StorageBytes => _entries.Sum(e => e.Data.StorageBytes);

    /// <summary>Values stored in NF4.</summary>
    public long QuantizedParameters => _entries.Sum(e => e.Data.Count);

    /// <summary>Bytes of the shared dequantization buffers.</summary>
    public long BufferBytes => _buffers.Values.Sum(b => b.numel() * b.element_size());

    /// <summary>How many times a weight was dequantized (forward + backward), for tests and profiling.</summary>
    public long Dequantizations { get; private set; }

    /// <summary>The stored weight of one module.</summary>
    public Nf4Tensor this[string path] => _entries.First(e => e.Path == path).Data;

    /// <summary>
    /// Quantizes the current weight of every Linear of <paramref name="root"/> whose path <paramref name="select"/>
    /// accepts (bias-free or not: a bias stays in full precision). The buffers have the weight's dtype (float32 or
    /// bfloat16), which is the matmul's compute dtype.
    /// </summary>
    public static Nf4Linears Quantize(nn.Module root, Func<string, bool> select)
    {
        var set = new Nf4Linears();
        foreach (var (path, module) in root.named_modules())
        {
            if (module is not Linear lin || !select(path)) continue;
            var w = lin.weight ?? throw new ArgumentException($"Linear '{path}' has no weight");
            Nf4Tensor q;
            using (var f = w.detach().to_type(ScalarType.Float32).contiguous())
                q = Nf4.Quantize(MemoryMarshal.Cast<byte, float>(f.bytes), [lin.out_features, lin.in_features]);
            set.Add(path, lin, q, w.dtype);
        }
        return set;
    }

    /// <summary>Makes <paramref name="module"/> compute with <paramref name="data"/> (its current weight is disposed).</summary>
    public void Add(string path, Linear module, Nf4Tensor data, ScalarType dtype)
    {
        if (dtype is not (ScalarType.Float32 or ScalarType.BFloat16))
            throw new ArgumentException($"NF4 compute dtype must be float32 or bfloat16, got {dtype}");
        if (data.Shape.Length != 2 || data.Shape[0] != module.out_features || data.Shape[1] != module.in_features)
            throw new ArgumentException($"'{path}': NF4 shape [{string.Join(", ", data.Shape)}] does not fit Linear({module.in_features}→{module.out_features})");
        var key = (module.out_features, module.in_features, dtype);
        if (!_buffers.TryGetValue(key, out var buffer))
        {
            var device = module.weight?.device ?? torch.CPU;
            buffer = new Parameter(torch.empty([module.out_features, module.in_features], dtype: dtype, device: device), requires_grad: false);
            _buffers[key] = buffer;
        }
        var old = module.weight;
        module.weight = buffer;
        if (old is not null && !_buffers.Values.Any(b => ReferenceEquals(b, old))) old.Dispose();
        var entry = new Entry(path, module, data, buffer);
        var pre = module.register_forward_pre_hook((m, x) => { Fill(entry); return x; });
        var post = module.register_forward_hook((m, x, y) => y.requires_grad ? RefillBeforeBackward.Apply(y, () => Fill(entry)) : y);
        entry.Hooks = new Handles(() => { pre.remove(); post.remove(); });
        _entries.Add(entry);
    }

    void Fill(Entry e)
    {
        Dequantizations++;
        var bytes = e.Buffer.bytes;
        if (e.Buffer.dtype == ScalarType.Float32) Nf4.Dequantize(e.Data, MemoryMarshal.Cast<byte, float>(bytes));
        else Nf4.DequantizeBf16(e.Data, MemoryMarshal.Cast<byte, ushort>(bytes));
    }

    /// <summary>The dequantized weight of one module as a new float32 tensor <c>[out, in]</c> on the module's device.</summary>
    public Tensor Dequantize(string path)
    {
        var e = _entries.FirstOrDefault(x => x.Path == path) ?? throw new KeyNotFoundException($"'{path}' is not quantized");
        var host = torch.tensor(Nf4.Dequantize(e.Data), e.Data.Shape, dtype: ScalarType.Float32);
        if (e.Buffer.device.type == DeviceType.CPU) return host;
        using (host) return host.to(e.Buffer.device);
    }

    public void Dispose()
    {
        foreach (var e in _entries) e.Hooks?.Dispose();
        _entries.Clear();
        foreach (var b in _buffers.Values) b.Dispose();
        _buffers.Clear();
    }

    /// <summary>Identity in forward; runs an action (refill the weight buffer) when its gradient passes, i.e. right before the producer's backward.</summary>
    sealed class RefillBeforeBackward : torch.autograd.SingleTensorFunction<RefillBeforeBackward>
    {
        public override string Name => "Nf4RefillBeforeBackward";

        public static Tensor Apply(Tensor y, Action refill) => apply(y, refill);

        public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
        {
            ctx.save_data("refill", vars[1]);
            return ((Tensor)vars[0]).alias();
        }

        public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad)
        {
            ((Action)ctx.get_data("refill"))();
            return [grad, null!]; // one entry per forward argument; the action gets none
        }
    }
}
