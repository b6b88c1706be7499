using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Adapters;

/// <summary>How attached adapters act on the base modules.</summary>
public enum AdapterMode
{
    /// <summary>Forward hooks add Σ m·y_delta(x) to each base output; base weights untouched (training, quick switching).</summary>
    Unmerged,
    /// <summary>W ← W₀ + Σ m·ΔW in place (inference at base speed); the original W₀ is kept to restore exactly.</summary>
    Merged,
}

/// <summary>Options for <see cref="AdapterHost.Attach"/>.</summary>
public sealed record AttachOptions
{
    /// <summary>Prefix put before every module path of the weights (e.g. "unet." when the host root holds the whole pipeline).</summary>
    public string PathPrefix { get; init; } = "";

    /// <summary>Report module paths missing from the tree instead of throwing.</summary>
    public bool Lenient { get; init; }

    /// <summary>Storage dtype of the adapter parameters (fp32 by default).</summary>
    public ScalarType DType { get; init; } = ScalarType.Float32;

    /// <summary>Compute dtype of the adapter branch in unmerged mode; null = the storage dtype.</summary>
    public ScalarType? ComputeDType { get; init; }

    /// <summary>Make the loaded adapter trainable (resume training); loaded adapters are frozen by default.</summary>
    public bool Trainable { get; init; }
}

/// <summary>A module path that could not take the adapter (not in the model, or not a Linear/Conv2d), with the closest adaptable paths.</summary>
public sealed record UnmatchedModule(string Path, IReadOnlyList<string> ClosestMatches, string Reason = "not in the model");

/// <summary>What an attach did: modules that got an adapter, paths not found, adaptable modules left untouched.</summary>
public sealed record AttachReport(
    string Name,
    IReadOnlyList<string> Attached,
    IReadOnlyList<UnmatchedModule> Unmatched,
    IReadOnlyList<string> Untouched)
{
    public override string ToString() =>
        $"{Name}: {Attached.Count} module(s) attached, {Unmatched.Count} unmatched, {Untouched.Count} adaptable module(s) untouched"
        + (Unmatched.Count > 0 ? "; unmatched: " + string.Join(", ", Unmatched.Take(10).Select(u => $"{u.Path} ({u.Reason})")) + (Unmatched.Count > 10 ? ", …" : "") : "");
}

/// <summary>
/// One named adapter attached to an <see cref="AdapterHost"/>: its per-module adapter modules plus the live
/// settings (multiplier, enabled, per-component and per-module weights). Settings can change at any time;
/// in merged mode the changed modules are re-merged once, before their next forward (or on <see cref="AdapterHost.ApplyPending"/>).
/// </summary>
public sealed class AttachedAdapter
{
    readonly AdapterHost _host;
    double _multiplier;
    bool _enabled = true;
    IReadOnlyDictionary<string, double>? _components;
    Func<string, double>? _moduleWeight;

    internal AttachedAdapter(AdapterHost host, string name, IReadOnlyList<Adapter> modules, double multiplier, bool trainable, AttachReport report,
        IReadOnlyDictionary<string, string> metadata)
    {
        _host = host; Name = name; Modules = modules; _multiplier = multiplier; Trainable = trainable; Report = report; Metadata = metadata;
    }

    public string Name { get; }
    /// <summary>The adapter modules, one per base module path (host paths, prefix included).</summary>
    public IReadOnlyList<Adapter> Modules { get; }
    public AttachReport Report { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }
    /// <summary>Whether the parameters go to the optimizer (<see cref="AdapterHost.TrainableParameters"/>).</summary>
    public bool Trainable { get; }

    /// <summary>The overall strength m (A1111 &lt;lora:name:m&gt;).</summary>
    public double Multiplier { get => _multiplier; set { _multiplier = value; _host.MarkDirty(this); } }

    public bool Enabled { get => _enabled; set { _enabled = value; _host.MarkDirty(this); } }

    /// <summary>
    /// Per-component multipliers by path prefix (longest prefix wins, unmatched paths use 1), multiplied into
    /// <see cref="Multiplier"/>: e.g. {"text_encoder.": te, "unet.": unet} for A1111 &lt;lora:name:te:unet&gt;.
    /// </summary>
    public IReadOnlyDictionary<string, double>? ComponentMultipliers
    {
        get => _components;
        set { _components = value is null ? null : new Dictionary<string, double>(value); _host.MarkDirty(this); }
    }

    /// <summary>Per-module weight (e.g. LoRA Block Weight), multiplied in; called with the host module path.</summary>
    public Func<string, double>? ModuleWeight { get => _moduleWeight; set { _moduleWeight = value; _host.MarkDirty(this); } }

    /// <summary>
    /// A1111 &lt;lora:name:te:unet&gt;: the text-encoder multiplier for paths under "text_encoder." and "text_encoder_2."
    /// (SDXL), the UNet multiplier for "unet." (the component prefixes of LoraSharp's SD models and Formats).
    /// </summary>
    public void SetComponentMultipliers(double textEncoder, double unet) =>
        ComponentMultipliers = new Dictionary<string, double> { ["text_encoder."] = textEncoder, ["text_encoder_2."] = textEncoder, ["unet."] = unet };

    /// <summary>The multiplier this adapter has on one module: enabled × m × component × module weight.</summary>
    public double MultiplierFor(string path)
    {
        if (!_enabled) return 0;
        double m = _multiplier;
        if (_components is not null)
        {
            string? best = null;
            foreach (var p in _components.Keys)
                if (path.StartsWith(p, StringComparison.Ordinal) && (best is null || p.Length > best.Length)) best = p;
            if (best is not null) m *= _components[best];
        }
        if (_moduleWeight is not null) m *= _moduleWeight(path);
        return m;
    }

    /// <summary>A copy of the weights in the contract form (paths as attached, without the host prefix).</summary>
    public AdapterWeights Export(string stripPrefix = "")
    {
        var mods = Modules.Select(a =>
        {
            var w = a.ToWeights();
            if (stripPrefix.Length == 0 || !w.ModulePath.StartsWith(stripPrefix, StringComparison.Ordinal)) return w;
            return new ModuleAdapterWeights
            {
                ModulePath = w.ModulePath[stripPrefix.Length..], Algorithm = w.Algorithm, Tensors = w.Tensors, Alpha = w.Alpha, RsLora = w.RsLora,
                Convention = w.Convention, FanInFanOut = w.FanInFanOut, Rank = w.Rank,
            };
        }).ToList();
        return new AdapterWeights { Name = Name, Modules = mods, Metadata = Metadata };
    }
}

/// <summary>
/// Attaches adapters to the Linear and Conv2d modules of any TorchSharp module tree, selected by
/// <c>named_modules()</c> path. Several adapters may be attached at once, each with its own live multiplier.
/// Unmerged mode uses forward hooks (they run only when the model invokes the module with <c>call()</c>); merged
/// mode writes W₀ + Σ m·ΔW into the weights under no_grad, caching each adapter's ΔW in fp32 so only changed
/// settings cost anything, and keeps an exact copy of W₀ so <see cref="Unmerge"/> restores the weights bit-exactly
/// (in every dtype, including fp16/bf16).
/// </summary>
public sealed class AdapterHost : IDisposable
{
    sealed class Slot(string path, nn.Module<Tensor, Tensor> module, LayerGeometry geometry, Parameter weight, Parameter? bias)
    {
        public readonly string Path = path;
        public readonly nn.Module<Tensor, Tensor> Module = module;
        public readonly LayerGeometry Geometry = geometry;
        public readonly Parameter Weight = weight;
        public readonly Parameter? Bias = bias;
        public readonly List<(AttachedAdapter Owner, Adapter Adapter)> Entries = [];
        public readonly Dictionary<Adapter, Tensor> DeltaCache = [];
        public IDisposable? Hooks;
        public Tensor? BackupWeight, BackupBias;
        public bool Dirty;
    }

    sealed class HookHandles(Action remove) : IDisposable
    {
        public void Dispose() => remove();
    }

    readonly nn.Module _root;
    readonly Dictionary<string, Slot> _slots = new(StringComparer.Ordinal);
    readonly List<string> _adaptable = [];
    readonly Dictionary<string, nn.Module> _allModules = new(StringComparer.Ordinal);
    readonly List<AttachedAdapter> _adapters = [];
    AdapterMode _mode = AdapterMode.Unmerged;
    bool _disposed;

    public AdapterHost(nn.Module root)
    {
        _root = root;
        foreach (var (name, m) in root.named_modules())
        {
            _allModules[name] = m;
            if (m is Linear || m is Conv2d { groups: 1 }) _adaptable.Add(name);
        }
    }

    public nn.Module Root => _root;

    /// <summary>Paths of every Linear and Conv2d (groups = 1) in the tree, in <c>named_modules()</c> order.</summary>
    public IReadOnlyList<string> AdaptableModules => _adaptable;

    public IReadOnlyList<AttachedAdapter> Adapters => _adapters;

    public AttachedAdapter this[string name] =>
        _adapters.FirstOrDefault(a => a.Name == name) ?? throw new KeyNotFoundException($"No adapter named '{name}' (attached: {string.Join(", ", _adapters.Select(a => a.Name))}).");

    public AdapterMode Mode => _mode;

    /// <summary>
    /// Unmerged inference (no autograd): adapters add their output into the base module's output tensor in place
    /// (default) instead of into a copy — one output-sized allocation and memory pass less per adapted module. Turn it
    /// off if other code keeps a reference to a module's raw output (e.g. another forward hook that stores it).
    /// </summary>
    public bool InPlaceAccumulation { get; set; } = true;

    /// <summary>
    /// For a base whose Linear weights are not resident (QLoRA's NF4 store: each module's weight is a shared buffer
    /// refilled right before the module runs): the module's dequantized weight by path. When set, a new DoRA adapter
    /// starts its magnitude from it, DoRA's forward reads a private copy of the buffer taken while it still holds this
    /// module's weight (as PEFT dequantizes for DoRA on a 4-bit base), and merged mode is refused.
    /// </summary>
    public Func<string, Tensor>? DequantizedWeight { get; set; }

    /// <summary>
    /// Keep each adapter's ΔW (fp32) between merges, so a multiplier change costs one add per adapter (default).
    /// Off: ΔW is recomputed at every re-merge — for models where an fp32 copy of every adapted weight does not fit.
    /// </summary>
    public bool CacheDeltas
    {
        get => _cacheDeltas;
        set
        {
            _cacheDeltas = value;
            if (!value) InvalidateCache();
        }
    }
    bool _cacheDeltas = true;

    /// <summary>
    /// Attach file weights (the Formats contract). Every module path must exist in the tree (with
    /// <see cref="AttachOptions.PathPrefix"/>); an unknown path throws listing the closest paths, or is reported
    /// when <see cref="AttachOptions.Lenient"/>. The weights are copied; the caller may dispose them afterwards.
    /// </summary>
    public AttachedAdapter Attach(AdapterWeights weights, string? name = null, double multiplier = 1, AttachOptions? options = null)
    {
        options ??= new AttachOptions();
        name ??= weights.Name;
        CheckNewName(name);
        var unmatched = new List<UnmatchedModule>();
        var built = new List<(Slot, Adapter)>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        try
        {
            foreach (var mw in weights.Modules)
            {
                var path = options.PathPrefix + mw.ModulePath;
                if (!seen.Add(path)) throw new LoraSharpException($"Adapter '{name}': module '{path}' appears twice.");
                if (!_allModules.TryGetValue(path, out var module))
                {
                    var u = new UnmatchedModule(path, ClosestPaths(path));
                    if (!options.Lenient)
                        throw new LoraSharpException($"Adapter '{name}': module '{path}' is not in the model. Closest: {string.Join(", ", u.ClosestMatches)}.", key: path);
                    unmatched.Add(u);
                    continue;
                }
                if (module is not (Linear or Conv2d { groups: 1 }))
                {
                    var u = new UnmatchedModule(path, ClosestPaths(path), $"is a {module.GetType().Name}, not a Linear or Conv2d (groups 1)");
                    if (!options.Lenient)
                        throw new LoraSharpException($"Adapter '{name}': module '{path}' {u.Reason}. Closest adaptable: {string.Join(", ", u.ClosestMatches)}.", key: path);
                    unmatched.Add(u);
                    continue;
                }
                var slot = SlotFor(path, module);
                var a = AdapterFactory.FromWeights(Rebased(mw, path), slot.Geometry, options.DType, slot.Weight.device, options.Trainable);
                a.ComputeDType = options.ComputeDType;
                if (a.DeltaBias() is not null && slot.Bias is null)
                    throw new LoraSharpException($"Adapter '{name}': module '{path}' has no bias but the adapter has diff_b.", key: path);
                built.Add((slot, a));
            }
        }
        catch
        {
            foreach (var (_, a) in built) a.Dispose();
            throw;
        }
        return Register(name, built, multiplier, options.Trainable, unmatched, weights.Metadata);
    }

    /// <summary>Create a new trainable adapter on every adaptable module the selector picks.</summary>
    public AttachedAdapter Create(string name, AdapterConfig config, ModuleSelector selector, double multiplier = 1) =>
        Create(name, (_, _) => config, selector, multiplier);

    /// <summary>
    /// Create a new trainable adapter with a configuration per module (kohya's block-wise dims): <paramref name="configFor"/>
    /// gets each selected module's path and geometry and returns its configuration, or null to leave the module out.
    /// </summary>
    public AttachedAdapter Create(string name, Func<string, LayerGeometry, AdapterConfig?> configFor, ModuleSelector selector, double multiplier = 1)
    {
        CheckNewName(name);
        var paths = _adaptable.Where(selector.Matches).ToList();
        if (paths.Count == 0)
            throw new LoraSharpException($"Adapter '{name}': the selector {selector} matches no Linear/Conv2d module. Some module paths: {string.Join(", ", _adaptable.Take(8))}.");
        var built = new List<(Slot, Adapter)>();
        foreach (var p in paths)
        {
            var slot = SlotFor(p, _allModules[p]);
            if (configFor(p, slot.Geometry) is not { } config) continue;
            // DoRA starts from the original weight, also when other adapters are merged into it right now
            using var dequantized = config.Dora != DoraKind.None ? DequantizedWeight?.Invoke(p) : null;
            built.Add((slot, AdapterFactory.Create(p, slot.Geometry, config, slot.Weight.device, dequantized ?? slot.BackupWeight ?? slot.Weight)));
        }
        if (built.Count == 0) throw new LoraSharpException($"Adapter '{name}': every module the selector {selector} matches was left out (all ranks 0).");
        return Register(name, built, multiplier, trainable: true, [], new Dictionary<string, string>());
    }

    /// <summary>Attach ready-made adapter modules (their <see cref="Adapter.ModulePath"/> must be host paths).</summary>
    public AttachedAdapter Add(string name, IEnumerable<Adapter> adapters, double multiplier = 1, bool trainable = false)
    {
        CheckNewName(name);
        var built = new List<(Slot, Adapter)>();
        foreach (var a in adapters)
        {
            if (!_allModules.TryGetValue(a.ModulePath, out var module))
                throw new LoraSharpException($"Adapter '{name}': module '{a.ModulePath}' is not in the model. Closest: {string.Join(", ", ClosestPaths(a.ModulePath))}.");
            built.Add((SlotFor(a.ModulePath, module), a));
        }
        return Register(name, built, multiplier, trainable, [], new Dictionary<string, string>());
    }

    /// <summary>Remove an adapter (its modules are disposed).</summary>
    public void Detach(string name)
    {
        var owner = this[name];
        foreach (var slot in _slots.Values)
        {
            int removed = slot.Entries.RemoveAll(e => e.Owner == owner);
            if (removed == 0) continue;
            foreach (var a in owner.Modules) if (slot.DeltaCache.Remove(a, out var t)) t.Dispose();
            slot.Dirty = true;
        }
        _adapters.Remove(owner);
        foreach (var a in owner.Modules) a.Dispose();
        if (_mode == AdapterMode.Merged) ApplyPending();
    }

    /// <summary>Turn off requires_grad on every parameter of the base model.</summary>
    public void FreezeBase()
    {
        foreach (var p in _root.parameters()) p.requires_grad = false;
    }

    /// <summary>
    /// The parameters to hand an optimizer: those of trainable adapters (all of them, or of one adapter). Never a
    /// base parameter (adapters are not registered in the base tree).
    /// </summary>
    public IReadOnlyList<Parameter> TrainableParameters(string? name = null) =>
        NamedTrainableParameters(name).Select(p => p.Param).ToList();

    /// <summary>As <see cref="TrainableParameters"/>, named "adapter/module path/parameter".</summary>
    public IReadOnlyList<(string Name, Parameter Param)> NamedTrainableParameters(string? name = null) =>
        _adapters.Where(a => a.Trainable && (name is null || a.Name == name))
            .SelectMany(a => a.Modules.SelectMany(m => m.Parameters.Select(p => ($"{a.Name}/{m.ModulePath}/{p.Name}", p.Param))))
            .ToList();

    /// <summary>Switch to merged mode: W ← W₀ + Σ m·ΔW for every module with adapters (ΔW cached in fp32).</summary>
    public void Merge()
    {
        if (DequantizedWeight is not null)
            throw new InvalidOperationException("merged mode needs resident base weights; this base is quantized (NF4): run the adapters unmerged, or merge into the full-precision model");
        _mode = AdapterMode.Merged;
        foreach (var s in _slots.Values) s.Dirty = true;
        ApplyPending();
    }

    /// <summary>Back to unmerged mode: every weight restored bit-exactly from the kept copy.</summary>
    public void Unmerge()
    {
        using var _ = no_grad();
        foreach (var s in _slots.Values) Restore(s);
        _mode = AdapterMode.Unmerged;
    }

    /// <summary>In merged mode, re-merge every module whose adapters or multipliers changed (also done lazily before a forward).</summary>
    public void ApplyPending()
    {
        if (_mode != AdapterMode.Merged) return;
        foreach (var s in _slots.Values) if (s.Dirty) ApplyMerged(s);
    }

    /// <summary>Forget cached ΔW of an adapter (after its parameters changed, e.g. training) so merged mode recomputes it.</summary>
    public void InvalidateCache(string? name = null)
    {
        foreach (var s in _slots.Values)
            foreach (var (owner, a) in s.Entries)
                if (name is null || owner.Name == name)
                {
                    if (s.DeltaCache.Remove(a, out var t)) t.Dispose();
                    s.Dirty = true;
                }
    }

    internal void MarkDirty(AttachedAdapter owner)
    {
        foreach (var s in _slots.Values)
            if (s.Entries.Any(e => e.Owner == owner)) s.Dirty = true;
    }

    // ---------------------------------------------------------------------------------------------

    void CheckNewName(string name)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (string.IsNullOrWhiteSpace(name)) throw new ArgumentException("Adapter name must not be empty.");
        if (_adapters.Any(a => a.Name == name)) throw new ArgumentException($"An adapter named '{name}' is already attached.");
    }

    static ModuleAdapterWeights Rebased(ModuleAdapterWeights w, string path) => w.ModulePath == path ? w : new ModuleAdapterWeights
    {
        ModulePath = path, Algorithm = w.Algorithm, Tensors = w.Tensors, Alpha = w.Alpha, RsLora = w.RsLora, Convention = w.Convention,
        FanInFanOut = w.FanInFanOut, Rank = w.Rank,
    };

    AttachedAdapter Register(string name, List<(Slot Slot, Adapter Adapter)> built, double multiplier, bool trainable,
        List<UnmatchedModule> unmatched, IReadOnlyDictionary<string, string> metadata)
    {
        var attachedPaths = built.Select(b => b.Slot.Path).ToHashSet();
        var report = new AttachReport(name, built.Select(b => b.Slot.Path).ToList(), unmatched,
            _adaptable.Where(p => !attachedPaths.Contains(p)).ToList());
        var owner = new AttachedAdapter(this, name, built.Select(b => b.Adapter).ToList(), multiplier, trainable, report, metadata);
        foreach (var (slot, a) in built)
        {
            slot.Entries.Add((owner, a));
            slot.Dirty = true;
            EnsureHooks(slot);
        }
        _adapters.Add(owner);
        return owner;
    }

    Slot SlotFor(string path, nn.Module module)
    {
        if (_slots.TryGetValue(path, out var s)) return s;
        var g = LayerGeometry.Of(module, path);
        var (weight, bias) = module switch
        {
            Linear l => (l.weight!, l.bias),
            Conv2d c => (c.weight!, c.bias),
            _ => throw new NotSupportedException($"Module '{path}' is not adaptable."),
        };
        s = new Slot(path, (nn.Module<Tensor, Tensor>)module, g, weight, bias);
        _slots[path] = s;
        return s;
    }

    void EnsureHooks(Slot s)
    {
        if (s.Hooks is not null) return;
        var pre = s.Module.register_forward_pre_hook((m, x) =>
        {
            if (_mode == AdapterMode.Merged && s.Dirty) ApplyMerged(s);
            return x;
        });
        var post = s.Module.register_forward_hook((m, x, y) => _mode == AdapterMode.Unmerged ? AddAdapters(s, m.training, x, y) : y);
        s.Hooks = new HookHandles(() => { pre.remove(); post.remove(); });
    }

    Tensor AddAdapters(Slot s, bool training, Tensor x, Tensor y)
    {
        if (s.Entries.Count == 0) return y;
        Tensor? result = null;
        // Without autograd (inference) adapters accumulate into the base output in place — unless one of them (DoRA)
        // reads the base output itself. With autograd the output may be a view made by another hook's custom Function
        // (e.g. QLoRA's weight refill), which autograd forbids modifying in place; it saved nothing measurable there anyway.
        bool inPlace = InPlaceAccumulation && !y.requires_grad && !s.Entries.Any(e => e.Adapter.Dora != DoraKind.None);
        using (var scope = NewDisposeScope())
        {
            Tensor weight = s.Weight;
            // a quantized base's buffer is refilled by the next module: DoRA (which may keep the weight for backward) gets a copy
            if (DequantizedWeight is not null && s.Entries.Any(e => e.Adapter.Dora != DoraKind.None)) weight = s.Weight.detach().clone();
            foreach (var (owner, a) in s.Entries)
            {
                double m = owner.MultiplierFor(s.Path);
                if (m == 0) continue;
                result = a.AddTo(result ?? y, x, y, weight, s.Bias, m, training, inPlace) ?? result;
            }
            result?.MoveToOuterDisposeScope();
        }
        return result ?? y;
    }

    void ApplyMerged(Slot s)
    {
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        s.BackupWeight ??= s.Weight.detach().clone().DetachFromDisposeScope();
        if (s.Bias is not null) s.BackupBias ??= s.Bias.detach().clone().DetachFromDisposeScope();
        // fp32 merge arithmetic (fp64 for fp64 weights), one rounding to the weight's dtype at the end
        var mergeType = s.Weight.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        var w0 = s.BackupWeight.to(mergeType);
        Tensor? sumW = null, sumB = null;
        foreach (var (owner, a) in s.Entries)
        {
            double m = owner.MultiplierFor(s.Path);
            if (m == 0) continue; // m = 0 (or disabled) means no effect, in both modes
            if (!s.DeltaCache.TryGetValue(a, out var delta))
            {
                var saved = a.ComputeDType;
                a.ComputeDType = mergeType;
                try { delta = a.DeltaWeight().detach(); }
                finally { a.ComputeDType = saved; }
                if (CacheDeltas) s.DeltaCache[a] = delta.DetachFromDisposeScope(); // the cache outlives this scope
            }
            if (a.Dora == DoraKind.None)
                sumW = sumW is null ? w0.add(delta, m) : sumW.add_(delta, m); // W₀ + Σ m·ΔW, one pass per adapter
            else
            {
                var eff = a.EffectiveDelta(w0, delta, m);
                sumW = sumW is null ? w0.add(eff) : sumW.add_(eff);
            }
            var db = a.DeltaBias();
            if (db is not null)
            {
                var e = db.to(mergeType).mul(m);
                sumB = sumB is null ? e : sumB.add_(e);
            }
        }
        s.Weight.copy_(sumW ?? s.BackupWeight);
        if (s.Bias is not null) s.Bias.copy_(sumB is null ? s.BackupBias! : s.BackupBias!.to(mergeType).add(sumB));
        s.Dirty = false;
    }

    static void Restore(Slot s)
    {
        if (s.BackupWeight is not null) s.Weight.copy_(s.BackupWeight);
        if (s.BackupBias is not null && s.Bias is not null) s.Bias.copy_(s.BackupBias);
        s.BackupWeight?.Dispose(); s.BackupBias?.Dispose();
        s.BackupWeight = null; s.BackupBias = null;
        s.Dirty = true;
    }

    IReadOnlyList<string> ClosestPaths(string path, int count = 3)
    {
        // Prefer candidates sharing the last path component, then edit distance.
        string last = path[(path.LastIndexOf('.') + 1)..];
        return _adaptable
            .Select(p => (p, d: EditDistance.Levenshtein(p, path) - (p.EndsWith("." + last, StringComparison.Ordinal) || p == last ? 5 : 0)))
            .OrderBy(t => t.d).ThenBy(t => t.p, StringComparer.Ordinal).Take(count).Select(t => t.p).ToList();
    }

    /// <summary>
    /// The Linear/Conv2d modules of <paramref name="root"/> that a forward does not invoke through <c>call()</c>:
    /// hook-based adapters would silently do nothing there. Registers temporary hooks, runs
    /// <paramref name="runForward"/>, removes them. A model test should assert this list is empty.
    /// </summary>
    public static IReadOnlyList<string> ModulesNotCalled(nn.Module root, Action runForward)
    {
        var called = new HashSet<string>(StringComparer.Ordinal);
        var handles = new List<Action>();
        var all = new List<string>();
        try
        {
            foreach (var (name, m) in root.named_modules())
            {
                if (m is not (Linear or Conv2d)) continue;
                all.Add(name);
                var path = name;
                var h = ((nn.Module<Tensor, Tensor>)m).register_forward_hook((_, _, y) => { called.Add(path); return y; });
                handles.Add(h.remove);
            }
            runForward();
        }
        finally
        {
            foreach (var remove in handles) remove();
        }
        return all.Where(p => !called.Contains(p)).ToList();
    }

    /// <summary>Restores the base weights, removes the hooks and disposes every adapter.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        Unmerge();
        foreach (var s in _slots.Values)
        {
            s.Hooks?.Dispose();
            foreach (var t in s.DeltaCache.Values) t.Dispose();
            s.DeltaCache.Clear();
        }
        foreach (var a in _adapters) foreach (var m in a.Modules) m.Dispose();
        _adapters.Clear();
        _disposed = true;
    }
}
