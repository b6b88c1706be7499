using System.Globalization;
using TorchSharp;
using static TorchSharp.torch;
using Parameter = TorchSharp.Modules.Parameter;

namespace LoraSharp.Training.Optim;

/// <summary>A set of parameters sharing a learning rate (kohya: one group for the UNet adapter, one for the text encoder's).</summary>
public sealed class ParamGroup(string name, IReadOnlyList<Parameter> parameters, double learningRate, double weightDecay = 0)
{
    public string Name { get; } = name;
    public IReadOnlyList<Parameter> Parameters { get; } = parameters;
    /// <summary>The configured (peak) learning rate.</summary>
    public double BaseLearningRate { get; } = learningRate;
    /// <summary>The learning rate of the next step (a scheduler sets it: base × factor).</summary>
    public double LearningRate { get; set; } = learningRate;
    public double WeightDecay { get; set; } = weightDecay;
}

/// <summary>
/// An <see cref="ITrainingOptimizer"/> over parameter groups with their own learning rates (kohya: UNet and text
/// encoder), with explicit, serialisable state. <see cref="ITrainingOptimizer.Step"/> runs under no_grad and disposes
/// its temporaries; state tensors live until Dispose. Setting <see cref="ITrainingOptimizer.LearningRate"/> scales every
/// group so the groups keep the ratio of their base learning rates.
/// </summary>
public interface IGroupedOptimizer : ITrainingOptimizer
{
    /// <summary>kohya's optimizer_type name (ss_optimizer).</summary>
    string Name { get; }
    IReadOnlyList<ParamGroup> Groups { get; }
    /// <summary>The state as named tensors plus scalars, for saving (copies).</summary>
    (Dictionary<string, Tensor> Tensors, Dictionary<string, string> Scalars) StateDict();
    /// <summary>Restores a state written by <see cref="StateDict"/> (same parameter order and shapes).</summary>
    void LoadStateDict(IReadOnlyDictionary<string, Tensor> tensors, IReadOnlyDictionary<string, string> scalars);
}

/// <summary>Shared bookkeeping: per-parameter state tensors keyed "g{group}.p{index}.{name}", scalar state, state size.</summary>
public abstract class GroupedOptimizer : IGroupedOptimizer
{
    protected readonly Dictionary<string, Tensor> StateTensors = new(StringComparer.Ordinal);
    protected readonly Dictionary<string, double> Scalars = new(StringComparer.Ordinal);
    bool _disposed;

    protected GroupedOptimizer(IReadOnlyList<ParamGroup> groups)
    {
        if (groups.Count == 0 || groups.All(g => g.Parameters.Count == 0))
            throw new ArgumentException("the optimizer has no parameters", nameof(groups));
        Groups = groups;
    }

    public abstract string Name { get; }
    public IReadOnlyList<ParamGroup> Groups { get; }
    public long StepCount { get; protected set; }

    protected static string Key(int g, int i, string name) => $"g{g}.p{i}.{name}";

    /// <summary>The state tensor for a parameter, created by <paramref name="create"/> on first use (detached from scopes).</summary>
    protected Tensor StateOf(int g, int i, string name, Func<Tensor> create)
    {
        var k = Key(g, i, name);
        if (!StateTensors.TryGetValue(k, out var t))
        {
            using (no_grad()) t = create().detach();
            t.DetachFromDisposeScope();
            StateTensors[k] = t;
        }
        return t;
    }

    public void Step()
    {
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        StepCore();
        CommitMasters();
        StepCount++;
    }

    /// <summary>
    /// The tensor an update is applied to: the parameter itself, or for a parameter stored in a 16-bit float type its
    /// float32 master copy (state "master", made from the parameter on first use), so that updates below the 16-bit
    /// resolution accumulate instead of rounding away (mixed-precision training's master weights). After each step the
    /// parameter receives its master, rounded (<see cref="CommitMasters"/>).
    /// </summary>
    Tensor Working(int g, int i, Parameter p) =>
        p.dtype is ScalarType.BFloat16 or ScalarType.Float16 ? StateOf(g, i, "master", () => p.detach().to_type(ScalarType.Float32)) : p;

    void CommitMasters()
    {
        for (int g = 0; g < Groups.Count; g++)
            for (int i = 0; i < Groups[g].Parameters.Count; i++)
                if (Groups[g].Parameters[i].grad is not null && StateTensors.TryGetValue(Key(g, i, "master"), out var master))
                    Groups[g].Parameters[i].copy_(master);
    }

    /// <summary>The update; runs inside a dispose scope under no_grad.</summary>
    protected abstract void StepCore();

    /// <summary>The first group's learning rate; setting it scales every group by the same factor of its base rate.</summary>
    public double LearningRate
    {
        get => Groups[0].LearningRate;
        set
        {
            double factor = Groups[0].BaseLearningRate == 0 ? 0 : value / Groups[0].BaseLearningRate;
            foreach (var g in Groups) g.LearningRate = g.BaseLearningRate * factor;
        }
    }

    /// <summary><see cref="ITrainingOptimizer.State"/>: the state tensors, "step" (int64) and "scalar/&lt;name&gt;" (float64) entries (copies).</summary>
    public IReadOnlyDictionary<string, Tensor> State()
    {
        var d = State_().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone(), StringComparer.Ordinal);
        d["step"] = tensor(StepCount);
        foreach (var (k, v) in Scalars) d["scalar/" + k] = tensor(v);
        return d;
    }

    IEnumerable<KeyValuePair<string, Tensor>> State_() => StateTensors;

    /// <summary>Restores what <see cref="State()"/> returned.</summary>
    public void LoadState(IReadOnlyDictionary<string, Tensor> state)
    {
        var tensors = state.Where(kv => kv.Key != "step" && !kv.Key.StartsWith("scalar/", StringComparison.Ordinal)).ToDictionary(kv => kv.Key, kv => kv.Value);
        var scalars = state.Where(kv => kv.Key.StartsWith("scalar/", StringComparison.Ordinal))
            .ToDictionary(kv => kv.Key["scalar/".Length..], kv => kv.Value.to_type(ScalarType.Float64).item<double>().ToString("R", CultureInfo.InvariantCulture));
        scalars["optimizer"] = Name;
        if (state.TryGetValue("step", out var s)) scalars["step_count"] = s.to_type(ScalarType.Int64).item<long>().ToString(CultureInfo.InvariantCulture);
        LoadStateDict(tensors, scalars);
    }

    public void ZeroGrad()
    {
        foreach (var g in Groups)
            foreach (var p in g.Parameters)
            {
                var grad = p.grad;
                if (grad is not null) { grad.Dispose(); p.grad = null; }
            }
    }

    public long StateBytes => StateTensors.Values.Sum(t => t.numel() * t.element_size());

    public virtual (Dictionary<string, Tensor> Tensors, Dictionary<string, string> Scalars) StateDict()
    {
        var tensors = StateTensors.ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone(), StringComparer.Ordinal);
        var scalars = Scalars.ToDictionary(kv => kv.Key, kv => kv.Value.ToString("R", CultureInfo.InvariantCulture), StringComparer.Ordinal);
        scalars["step_count"] = StepCount.ToString(CultureInfo.InvariantCulture);
        scalars["optimizer"] = Name;
        return (tensors, scalars);
    }

    public virtual void LoadStateDict(IReadOnlyDictionary<string, Tensor> tensors, IReadOnlyDictionary<string, string> scalars)
    {
        if (scalars.TryGetValue("optimizer", out var n) && n != Name)
            throw new LoraSharpException($"the saved optimizer state is {n}, this run uses {Name}", key: "optimizer_type");
        foreach (var t in StateTensors.Values) t.Dispose();
        StateTensors.Clear();
        foreach (var (k, v) in tensors)
        {
            var t = v.detach().clone();
            t.DetachFromDisposeScope();
            StateTensors[k] = t;
        }
        Scalars.Clear();
        foreach (var (k, v) in scalars)
        {
            if (k == "step_count") StepCount = long.Parse(v, CultureInfo.InvariantCulture);
            else if (k != "optimizer") Scalars[k] = double.Parse(v, CultureInfo.InvariantCulture);
        }
    }

    /// <summary>Each (group index, param index, group, tensor to update, gradient) with a gradient; the tensor is the parameter or its float32 master (<see cref="Working"/>).</summary>
    protected IEnumerable<(int G, int I, ParamGroup Group, Tensor P, Tensor Grad)> WithGrads()
    {
        for (int g = 0; g < Groups.Count; g++)
            for (int i = 0; i < Groups[g].Parameters.Count; i++)
            {
                var p = Groups[g].Parameters[i];
                var grad = p.grad;
                if (grad is null) continue;
                yield return (g, i, Groups[g], Working(g, i, p), grad);
            }
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var t in StateTensors.Values) t.Dispose();
        StateTensors.Clear();
        GC.SuppressFinalize(this);
    }
}

/// <summary>optimizer_args parsing ("weight_decay=0.01", "betas=0.9,0.99", "relative_step=False").</summary>
public sealed class OptimizerArgs
{
    readonly Dictionary<string, string> _values = new(StringComparer.Ordinal);
    readonly HashSet<string> _used = new(StringComparer.Ordinal);

    public OptimizerArgs(IEnumerable<string>? items)
    {
        foreach (var item in items ?? [])
        {
            int eq = item.IndexOf('=');
            if (eq <= 0) throw new LoraSharpException($"optimizer_args item '{item}' is not key=value", key: "optimizer_args");
            _values[item[..eq].Trim()] = item[(eq + 1)..].Trim();
        }
    }

    public double Double(string key, double fallback)
    {
        if (!_values.TryGetValue(key, out var v)) return fallback;
        _used.Add(key);
        return double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture, out var d) ? d
            : throw new LoraSharpException($"optimizer_args {key}={v}: expected a number", key: "optimizer_args");
    }

    public double? NullableDouble(string key)
    {
        if (!_values.TryGetValue(key, out var v)) return null;
        _used.Add(key);
        if (v is "None" or "none" or "null") return null;
        return Double(key, 0);
    }

    public bool Bool(string key, bool fallback)
    {
        if (!_values.TryGetValue(key, out var v)) return fallback;
        _used.Add(key);
        return v.ToLowerInvariant() switch
        {
            "true" or "1" => true,
            "false" or "0" => false,
            _ => throw new LoraSharpException($"optimizer_args {key}={v}: expected True or False", key: "optimizer_args"),
        };
    }

    public (double, double) Pair(string key, (double, double) fallback)
    {
        if (!_values.TryGetValue(key, out var v)) return fallback;
        _used.Add(key);
        var parts = v.Trim('(', ')', '[', ']').Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
        if (parts.Length != 2 || !double.TryParse(parts[0], NumberStyles.Float, CultureInfo.InvariantCulture, out var a)
            || !double.TryParse(parts[1], NumberStyles.Float, CultureInfo.InvariantCulture, out var b))
            throw new LoraSharpException($"optimizer_args {key}={v}: expected two numbers a,b", key: "optimizer_args");
        return (a, b);
    }

    /// <summary>Throws when an argument was not read by the optimizer (a typo, or an option it does not have).</summary>
    public void ThrowOnUnused(string optimizer)
    {
        var unused = _values.Keys.Where(k => !_used.Contains(k)).ToList();
        if (unused.Count > 0)
            throw new LoraSharpException($"optimizer_args not understood by {optimizer}: {string.Join(", ", unused)}", key: "optimizer_args");
    }
}

/// <summary>Creates optimizers by kohya's optimizer_type.</summary>
public static class OptimizerFactory
{
    public static IReadOnlyList<string> Names { get; } = ["AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor"];

    /// <summary>The canonical name of an optimizer_type (case-insensitive; "AdamW8bit" also as "adamw_8bit").</summary>
    public static string Normalize(string type) => type.Replace("_", "").ToLowerInvariant() switch
    {
        "adamw" => "AdamW",
        "adamw8bit" => "AdamW8bit",
        "lion" => "Lion",
        "prodigy" => "Prodigy",
        "adafactor" => "Adafactor",
        _ => throw new LoraSharpException($"optimizer_type '{type}' is not supported (expected one of: {string.Join(", ", Names)})", key: "optimizer_type"),
    };

    public static IGroupedOptimizer Create(string type, IReadOnlyList<ParamGroup> groups, IEnumerable<string>? optimizerArgs = null)
    {
        var a = new OptimizerArgs(optimizerArgs);
        var name = Normalize(type);
        IGroupedOptimizer opt = name switch
        {
            "AdamW" or "AdamW8bit" => new AdamWOptimizer(groups, a.Pair("betas", (0.9, 0.999)), a.Double("eps", 1e-8), a.Double("weight_decay", 0.01), eightBit: name == "AdamW8bit"),
            "Lion" => new LionOptimizer(groups, a.Pair("betas", (0.9, 0.99)), a.Double("weight_decay", 0)),
            "Prodigy" => new ProdigyOptimizer(groups, a.Pair("betas", (0.9, 0.999)), a.NullableDouble("beta3"), a.Double("eps", 1e-8), a.Double("weight_decay", 0),
                a.Bool("decouple", true), a.Bool("use_bias_correction", false), a.Bool("safeguard_warmup", false), a.Double("d0", 1e-6), a.Double("d_coef", 1.0),
                a.Double("growth_rate", double.PositiveInfinity)),
            _ => new AdafactorOptimizer(groups, a.Double("eps1", 1e-30), a.Double("eps2", 1e-3), a.Double("clip_threshold", 1.0), a.Double("decay_rate", -0.8),
                a.NullableDouble("beta1"), a.Double("weight_decay", 0), a.Bool("scale_parameter", true), a.Bool("relative_step", true), a.Bool("warmup_init", false)),
        };
        try { a.ThrowOnUnused(name); }
        catch { opt.Dispose(); throw; }
        return opt;
    }
}
