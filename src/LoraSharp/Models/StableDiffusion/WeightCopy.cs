using LoraSharp.IO;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Models.StableDiffusion;

/// <summary>How a stored tensor becomes a module parameter.</summary>
public enum TensorTransform
{
    /// <summary>Same shape.</summary>
    None,
    /// <summary>Same elements, shape differs only by trailing 1s: a 1×1 conv stored for a Linear or the reverse
    /// (ldm VAE attention q/k/v/proj_out; proj_in/proj_out of SD1 vs SD2 transformers).</summary>
    Reshape,
    /// <summary>A Linear weight [out, in] stored as a 1×1 conv [out, in, 1, 1] (ldm VAE attention q/k/v/proj_out).</summary>
    LinearAsConv1x1,
    /// <summary>A 2-D tensor stored transposed (OpenCLIP <c>text_projection</c> [hidden, proj]).</summary>
    Transpose,
    /// <summary>Row block <see cref="KeyMapping.Chunk"/> of 3 of a fused q/k/v tensor (OpenCLIP <c>attn.in_proj_weight</c>).</summary>
    FusedQkvChunk,
}

/// <summary>One parameter's source: <paramref name="Target"/> (module parameter name) is read from <paramref name="Source"/> (file key).</summary>
public sealed record KeyMapping(string Target, string Source, TensorTransform Transform = TensorTransform.None, int Chunk = 0)
{
    /// <summary>The shape the stored tensor will have after the transform; null when the transform cannot apply.</summary>
    public long[]? ShapeAfter(long[] stored) => Transform switch
    {
        TensorTransform.None or TensorTransform.Reshape => stored,
        TensorTransform.LinearAsConv1x1 => stored.Length == 4 && stored[2] == 1 && stored[3] == 1 ? stored[..2] : stored,
        TensorTransform.Transpose => stored.Length == 2 ? [stored[1], stored[0]] : null,
        TensorTransform.FusedQkvChunk => stored.Length >= 1 && stored[0] % 3 == 0 ? [stored[0] / 3, .. stored[1..]] : null,
        _ => null,
    };
}

/// <summary>What loading one component did: every parameter is loaded, or named here.</summary>
public sealed class WeightLoadReport
{
    public required string Component { get; init; }
    public required string FilePath { get; init; }
    public int Loaded { get; init; }
    /// <summary>Parameters whose source key is not in the file.</summary>
    public IReadOnlyList<string> Missing { get; init; } = [];
    /// <summary>"param: file key [shape] → expected [shape]".</summary>
    public IReadOnlyList<string> ShapeMismatches { get; init; } = [];
    /// <summary>File keys of this component that no parameter read.</summary>
    public IReadOnlyList<string> Unexpected { get; init; } = [];
    /// <summary>File keys deliberately not loaded (position_ids buffers, EMA copies, ldm schedule buffers, a dropped layer).</summary>
    public IReadOnlyList<string> Ignored { get; init; } = [];

    public bool IsComplete => Missing.Count == 0 && ShapeMismatches.Count == 0;

    public override string ToString() =>
        $"{Component}: {Loaded} loaded, {Missing.Count} missing, {ShapeMismatches.Count} mis-shaped, {Unexpected.Count} unexpected, {Ignored.Count} ignored ({FilePath})";
}

/// <summary>The name-checked copy from a tensor file into a module: every parameter and persistent buffer must be found with its shape.</summary>
public static class WeightCopy
{
    /// <summary>Identity mappings (file key = parameter name, with an optional file prefix) for every parameter of <paramref name="module"/>.</summary>
    public static IReadOnlyList<KeyMapping> Identity(nn.Module module, string sourcePrefix = "") =>
        StateKeys(module).Select(k => new KeyMapping(k, sourcePrefix + k)).ToArray();

    /// <summary>Parameter and buffer names of a module (its state dict keys).</summary>
    public static IReadOnlyList<string> StateKeys(nn.Module module) =>
        module.named_parameters().Select(p => p.name).Concat(module.named_buffers().Select(b => b.name)).ToArray();

    /// <summary>
    /// Copies every mapped tensor into <paramref name="module"/>'s parameters (converted to each parameter's dtype and
    /// device). Parameters without a mapping count as missing. Throws <see cref="LoraSharpException"/> listing all missing
    /// and mis-shaped keys unless <paramref name="allowIncomplete"/>; nothing is copied when it throws.
    /// </summary>
    /// <param name="consumed">Receives the file keys read (for the caller's unexpected-key report).</param>
    /// <param name="materializeOn">Parameters of a module built on the meta device (no memory, no initialisation) are
    /// replaced by the loaded tensors, placed on this device (default CPU); others are copied into.</param>
    public static WeightLoadReport Copy(nn.Module module, string component, ITensorSource source, IEnumerable<KeyMapping> mappings,
        ISet<string>? consumed = null, bool allowIncomplete = false, Device? materializeOn = null)
    {
        var targets = new Dictionary<string, Tensor>();
        foreach (var (name, p) in module.named_parameters()) targets[name] = p;
        foreach (var (name, b) in module.named_buffers()) targets[name] = b;

        var byTarget = new Dictionary<string, KeyMapping>();
        foreach (var m in mappings)
            if (targets.ContainsKey(m.Target)) byTarget[m.Target] = m;

        var missing = new List<string>();
        var mismatched = new List<string>();
        var plan = new List<(string Name, Tensor Param, KeyMapping Map)>();
        foreach (var (name, param) in targets)
        {
            if (!byTarget.TryGetValue(name, out var map) || !source.Contains(map.Source))
            {
                missing.Add(map is null ? name : $"{name} (file key {map.Source})");
                continue;
            }
            var stored = source.Info(map.Source).Shape;
            var after = map.ShapeAfter(stored);
            var expected = param.shape;
            bool ok = after is not null && (after.SequenceEqual(expected)
                || (map.Transform == TensorTransform.Reshape && SameUpToTrailingOnes(after, expected)));
            if (!ok)
            {
                mismatched.Add($"{name}: file key {map.Source} [{string.Join(", ", stored)}] ({map.Transform}) → expected [{string.Join(", ", expected)}]");
                continue;
            }
            plan.Add((name, param, map));
        }

        if (!allowIncomplete && (missing.Count > 0 || mismatched.Count > 0))
        {
            var lines = missing.Take(20).Select(m => "missing " + m).Concat(mismatched.Take(20).Select(m => "shape " + m));
            throw new LoraSharpException(
                $"{component}: {missing.Count} parameters missing and {mismatched.Count} with the wrong shape; first ones:\n  " + string.Join("\n  ", lines),
                source.FilePath);
        }

        var owners = new Dictionary<string, nn.Module>(module.named_modules().Select(m => KeyValuePair.Create(m.name, m.module))) { [""] = module };
        using (no_grad())
        {
            foreach (var (name, param, map) in plan)
            {
                using var scope = NewDisposeScope();
                bool onMeta = param.device.type == DeviceType.META;
                var t = source.Load(map.Source, param.dtype, onMeta ? materializeOn ?? CPU : param.device);
                t = map.Transform switch
                {
                    TensorTransform.Transpose => t.t().contiguous(),
                    TensorTransform.FusedQkvChunk => t.chunk(3, 0)[map.Chunk].clone(),
                    TensorTransform.Reshape or TensorTransform.LinearAsConv1x1 => t.reshape(param.shape),
                    _ => t,
                };
                if (onMeta)
                    Replace(owners, name, t);
                else
                    param.copy_(t);
                consumed?.Add(map.Source);
            }
        }

        return new WeightLoadReport
        {
            Component = component,
            FilePath = source.FilePath,
            Loaded = plan.Count,
            Missing = missing,
            ShapeMismatches = mismatched,
        };
    }

    /// <summary>Swaps a meta-device parameter for a real one through its owner's property (weight, bias of Linear,
    /// Conv2d, GroupNorm, LayerNorm, Embedding).</summary>
    static void Replace(Dictionary<string, nn.Module> owners, string name, Tensor value)
    {
        int dot = name.LastIndexOf('.');
        var owner = owners[dot < 0 ? "" : name[..dot]];
        var leaf = name[(dot + 1)..];
        var property = owner.GetType().GetProperty(leaf, System.Reflection.BindingFlags.Public | System.Reflection.BindingFlags.Instance);
        if (property is null || !property.CanWrite || !property.PropertyType.IsAssignableFrom(typeof(Parameter)))
            throw new InvalidOperationException($"cannot replace parameter {name}: {owner.GetType().Name} has no settable '{leaf}' property");
        var parameter = new Parameter(value, requires_grad: true);
        parameter.DetachFromDisposeScope();
        property.SetValue(owner, parameter);
    }

    static bool SameUpToTrailingOnes(long[] a, long[] b)
    {
        static long[] Trim(long[] s) { int n = s.Length; while (n > 2 && s[n - 1] == 1) n--; return s[..n]; }
        return Trim(a).SequenceEqual(Trim(b));
    }
}
