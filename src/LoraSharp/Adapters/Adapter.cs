using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Adapters;

/// <summary>
/// One adapter on one base module: holds the parameters (registered under the kohya/LyCORIS suffix names) and
/// delegates the math to the pure functions (<see cref="LoraMath"/>, <see cref="LohaMath"/>, <see cref="LokrMath"/>,
/// <see cref="FullMath"/>, <see cref="DoraMath"/>). It does not own the base module: <see cref="AdapterHost"/> wires
/// it in with a forward hook (unmerged) or adds <see cref="EffectiveDelta"/> to the weight (merged).
/// </summary>
public abstract class Adapter : nn.Module
{
    readonly List<string> _names = [];

    protected Adapter(string modulePath, LayerGeometry geometry, double? alpha, bool rsLora, ScaleConvention convention)
        : base(modulePath.Length == 0 ? "adapter" : modulePath)
    {
        ModulePath = modulePath;
        Geometry = geometry;
        Alpha = alpha;
        RsLora = rsLora;
        Convention = convention;
    }

    public string ModulePath { get; }
    public LayerGeometry Geometry { get; }
    public abstract AdapterAlgorithm Algorithm { get; }
    public double? Alpha { get; }
    public bool RsLora { get; }
    public ScaleConvention Convention { get; }

    /// <summary>The scale applied to the raw factor product (alpha/r, alpha/√r, 1, …).</summary>
    public abstract double Scale { get; }

    /// <summary>Training-only dropouts.</summary>
    public AdapterDropout Dropout
    {
        get => _dropout;
        set { value.Validate(); _dropout = value; }
    }
    AdapterDropout _dropout = AdapterDropout.None;

    /// <summary>Compute dtype of the adapter branch; null = the storage dtype of the parameters.</summary>
    public ScalarType? ComputeDType { get; set; }

    // ---- DoRA ----
    public DoraKind Dora { get; private set; }
    public DoraAxis DoraAxis { get; private set; } = DoraAxis.Output;
    /// <summary>Multiplier rule for <see cref="DoraKind.DoraScale"/> adapters (A1111/ComfyUI interpolation by default).</summary>
    public DoraMultiplierRule DoraRule { get; set; } = DoraMultiplierRule.Interpolate;
    /// <summary>Treat the DoRA norm as a constant in backward (PEFT and the paper §4.3); on by default.</summary>
    public bool DetachDoraNorm { get; set; } = true;
    /// <summary>PEFT magnitude vector [out] or dora_scale; null without DoRA.</summary>
    public Parameter? DoraMagnitude { get; private set; }

    /// <summary>The adapter's parameters by their file names (lora_down, hada_w1_a, …, magnitude / dora_scale).</summary>
    public IEnumerable<(string Name, Parameter Param)> Parameters => _names.Select(n => (n, get_parameter(n)!));

    protected Parameter AddParameter(string name, Tensor value, bool trainable)
    {
        if (_names.Count > 0 && value.dtype != StorageDType)
            throw new ArgumentException($"Module '{ModulePath}': parameter '{name}' is {value.dtype}, the others {StorageDType}.");
        _storageDType ??= value.dtype;
        var p = new Parameter(value, trainable);
        p.DetachFromDisposeScope(); // parameters live as long as the adapter, not the caller's dispose scope
        register_parameter(name, p);
        _names.Add(name);
        return p;
    }

    /// <summary>Make every parameter trainable (or frozen).</summary>
    public void SetTrainable(bool trainable)
    {
        foreach (var (_, p) in Parameters) p.requires_grad = trainable;
    }

    /// <summary>The dtype the parameters are stored in (all the same; fixed at construction).</summary>
    public ScalarType StorageDType => _storageDType ?? throw new InvalidOperationException("Adapter has no parameters.");
    ScalarType? _storageDType;

    protected ScalarType Dt => ComputeDType ?? StorageDType;

    /// <summary>A parameter in the compute dtype (a differentiable cast when it differs).</summary>
    protected Tensor P(Tensor p) => p.dtype == Dt ? p : p.to(Dt);
    protected Tensor? Pn(Tensor? p) => p is null ? null : P(p);

    /// <summary>Attach a DoRA magnitude. <paramref name="kind"/> Peft: [out]; DoraScale: axis inferred from the shape.</summary>
    public void SetDora(DoraKind kind, Tensor magnitude, bool trainable)
    {
        if (kind == DoraKind.None) throw new ArgumentException("Use a DoRA kind other than None.");
        if (Dora != DoraKind.None) throw new InvalidOperationException($"Module '{ModulePath}' already has DoRA.");
        if (kind == DoraKind.Peft)
        {
            if (magnitude.numel() != Geometry.OutFeatures)
                throw new ArgumentException($"Module '{ModulePath}': DoRA magnitude has {magnitude.numel()} values, expected {Geometry.OutFeatures} (one per output).");
            DoraAxis = DoraAxis.Output;
            DoraMagnitude = AddParameter("magnitude", magnitude.reshape(Geometry.OutFeatures), trainable);
        }
        else
        {
            DoraAxis = DoraMath.InferAxis(magnitude.shape, Geometry.WeightShape);
            DoraMagnitude = AddParameter("dora_scale", magnitude, trainable);
        }
        Dora = kind;
    }

    /// <summary>Initialise a new DoRA magnitude from the base weight: ‖W + ΔW‖ along the axis.</summary>
    public void InitDora(DoraKind kind, Tensor baseWeight)
    {
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var v = baseWeight.to(StorageDType).add(DeltaWeight().to(StorageDType));
        var n = DoraMath.Norm(v, DoraAxis.Output);
        SetDora(kind, kind == DoraKind.Peft ? n.reshape(Geometry.OutFeatures).detach().clone() : n.detach().clone(), true);
    }

    // ---- math ----

    /// <summary>The scaled weight delta (no multiplier, no DoRA), in the compute dtype, shaped like the base weight.</summary>
    public abstract Tensor DeltaWeight();

    /// <summary>The delta of the bias (Full adapters with diff_b); null otherwise.</summary>
    public virtual Tensor? DeltaBias() => null;

    /// <summary>ΔW used in a training forward: with rank dropout over output rows (LoHa/LoKr/Full, LyCORIS).</summary>
    protected Tensor DeltaWeightForTraining(bool training)
    {
        var dw = DeltaWeight();
        if (!training || Dropout.Rank <= 0) return dw;
        using var scope = NewDisposeScope();
        var keep = rand([dw.shape[0]], dtype: dw.dtype, device: dw.device).gt(Dropout.Rank).to(dw.dtype);
        if (Dropout.RankDropoutScale) keep = keep.div(keep.mean().clamp_min(1e-12));
        return dw.mul(keep.reshape([dw.shape[0], .. Enumerable.Repeat(1L, (int)dw.dim() - 1)])).MoveToOuterDisposeScope();
    }

    /// <summary>The adapter branch y_delta(x) (scaled, no multiplier, no DoRA, no bias), with training dropouts.</summary>
    public abstract Tensor Bypass(Tensor x, bool training);

    /// <summary>
    /// The change of the base weight this adapter makes at multiplier m, given the original base weight
    /// (linear algorithms: m·ΔW; DoRA: the non-linear decomposition).
    /// </summary>
    public Tensor EffectiveDelta(Tensor baseWeight, double multiplier) => EffectiveDelta(baseWeight, DeltaWeight(), multiplier);

    /// <summary>As <see cref="EffectiveDelta(Tensor,double)"/> with a precomputed ΔW (the host's fp32 cache).</summary>
    public Tensor EffectiveDelta(Tensor baseWeight, Tensor delta, double multiplier)
    {
        using var scope = NewDisposeScope();
        Tensor r = Dora switch
        {
            DoraKind.None => delta.mul(multiplier),
            DoraKind.Peft => DoraMath.EffectiveDelta(baseWeight, delta, DoraMagnitude!.to(delta.dtype), DoraAxis.Output, multiplier, peftStyle: true),
            _ => DoraMath.EffectiveDelta(baseWeight, delta, DoraMagnitude!.to(delta.dtype), DoraAxis, multiplier, peftStyle: false,
                DoraRule, DoraMath.Epsilon(delta.dtype)),
        };
        return r.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// What to add to the base module's output for input x at multiplier m (unmerged mode). Returns null when the
    /// adapter is skipped (module dropout). <paramref name="baseOutput"/> includes the base bias.
    /// </summary>
    public Tensor? ForwardDelta(Tensor x, Tensor baseOutput, Tensor baseWeight, Tensor? baseBias, double multiplier, bool training)
    {
        if (SkippedByModuleDropout(training)) return null;
        using var scope = NewDisposeScope();
        var xd = x.dtype == Dt ? x : x.to(Dt);
        Tensor y;
        switch (Dora)
        {
            case DoraKind.None:
            {
                y = Bypass(xd, training).mul(multiplier);
                break;
            }
            case DoraKind.Peft:
            {
                // PEFT DoRA: y = Wx + (mag/n − 1)·Wx + (mag/n)·m·s·B(A(drop(x))), n = ‖W + m·s·BA‖ per output row.
                var w = baseWeight.to(Dt);
                var dw = DeltaWeight().mul(multiplier);
                var n = DoraMath.Norm(w.add(DetachDoraNorm ? dw.detach() : dw), DoraAxis.Output);
                if (DetachDoraNorm) n = n.detach();
                var ratio = P(DoraMagnitude!).div(n.reshape(Geometry.OutFeatures)).reshape(Geometry.OutputBroadcastShape(baseOutput.dim()));
                var xin = training && Dropout.Input > 0 ? nn.functional.dropout(xd, Dropout.Input, true) : xd;
                Tensor baseNoBias = training && Dropout.Input > 0
                    ? Geometry.Apply(xin, w)
                    : (baseBias is null ? baseOutput : baseOutput.sub(baseBias.reshape(Geometry.OutputBroadcastShape(baseOutput.dim())))).to(Dt);
                var lora = BypassNoInputDropout(xin, training).mul(multiplier);
                y = ratio.sub(1).mul(baseNoBias).add(ratio.mul(lora));
                break;
            }
            default:
            {
                // kohya / LyCORIS dora_scale: non-bypass, F(x, W' − W).
                var w = baseWeight.to(Dt);
                var d = DoraMath.EffectiveDelta(w, DeltaWeightForTraining(training), P(DoraMagnitude!), DoraAxis, multiplier, peftStyle: false,
                    DoraRule, DoraMath.Epsilon(Dt), DetachDoraNorm && training);
                y = Geometry.Apply(xd, d);
                break;
            }
        }
        var db = DeltaBias();
        if (db is not null) y = y.add(P(db).mul(multiplier).reshape(Geometry.OutputBroadcastShape(y.dim())));
        if (y.dtype != baseOutput.dtype) y = y.to(baseOutput.dtype);
        return y.MoveToOuterDisposeScope();
    }

    /// <summary>kohya/LyCORIS module dropout: true when this forward skips the adapter.</summary>
    protected bool SkippedByModuleDropout(bool training) => training && Dropout.Module > 0 && rand(1).item<float>() < Dropout.Module;

    /// <summary>
    /// Unmerged mode: the running output <paramref name="accumulated"/> (base output plus earlier adapters) with this
    /// adapter added; null when skipped (module dropout). <paramref name="baseOutput"/> is the base module's own output.
    /// With <paramref name="inPlace"/> the sum is written into <paramref name="accumulated"/>: the caller guarantees that
    /// nothing else reads it and that no autograd graph records it (AdapterHost does this only without autograd and when
    /// no adapter needs the base output) — one output-sized allocation and copy less per adapted module.
    /// </summary>
    public virtual Tensor? AddTo(Tensor accumulated, Tensor x, Tensor baseOutput, Tensor baseWeight, Tensor? baseBias, double multiplier, bool training, bool inPlace = false)
    {
        var d = ForwardDelta(x, baseOutput, baseWeight, baseBias, multiplier, training);
        if (d is null) return null;
        return inPlace && d.dtype == accumulated.dtype ? accumulated.add_(d) : accumulated.add(d);
    }

    /// <summary>Bypass without the input dropout (PEFT DoRA applies it once, outside). Default: the plain bypass.</summary>
    protected virtual Tensor BypassNoInputDropout(Tensor x, bool training) => Bypass(x, training);

    /// <summary>Rank of the adapter for reports ("dim").</summary>
    public abstract long Rank { get; }

    /// <summary>A copy of the weights in the contract form (for saving by the Formats code).</summary>
    public virtual ModuleAdapterWeights ToWeights()
    {
        var tensors = new Dictionary<string, Tensor>();
        foreach (var (n, p) in Parameters) tensors[n] = p.detach().clone();
        return new ModuleAdapterWeights
        {
            ModulePath = ModulePath, Algorithm = Algorithm, Tensors = tensors, Alpha = Alpha, RsLora = RsLora, Convention = Convention,
            Rank = Algorithm == AdapterAlgorithm.LoKr && Rank > 0 ? (int)Rank : null,
        };
    }

    public override string ToString() => $"{Algorithm}{(Dora != DoraKind.None ? "+DoRA" : "")}(r={Rank}, scale={Scale:G4}) on {ModulePath} {Geometry}";
}

/// <summary>LoRA / LoCon (incl. Tucker lora_mid): parameters lora_down, lora_up, lora_mid.</summary>
public sealed class LoraAdapter : Adapter
{
    public LoraAdapter(string modulePath, LayerGeometry geometry, Tensor down, Tensor up, Tensor? mid, double? alpha, bool rsLora,
        ScaleConvention convention = ScaleConvention.LyCORIS, bool trainable = false)
        : base(modulePath, geometry, alpha, rsLora, convention)
    {
        LoraMath.CheckShapes(down, up, mid, geometry, $"Module '{modulePath}'");
        long rank = down.shape[0]; // a Parameter takes over the tensor's handle: read shapes first
        Down = AddParameter("lora_down", down, trainable);
        Up = AddParameter("lora_up", up, trainable);
        if (mid is not null) Mid = AddParameter("lora_mid", mid, trainable);
        Scale = LoraMath.Scale(alpha, rank, rsLora);
    }

    public Parameter Down { get; }
    public Parameter Up { get; }
    public Parameter? Mid { get; }
    public override AdapterAlgorithm Algorithm => AdapterAlgorithm.LoRA;
    public override double Scale { get; }
    public override long Rank => Down.shape[0];

    public override Tensor DeltaWeight() => LoraMath.DeltaWeight(P(Down), P(Up), Pn(Mid), Scale, Geometry);

    public override Tensor Bypass(Tensor x, bool training)
    {
        if (training && Dropout.Input > 0) x = nn.functional.dropout(x, Dropout.Input, true);
        return BypassNoInputDropout(x, training);
    }

    protected override Tensor BypassNoInputDropout(Tensor x, bool training) =>
        LoraBranch.Forward(x, P(Down), P(Up), Pn(Mid), Scale, Geometry, Dropout, training);

    /// <summary>Fast path without DoRA: the up projection accumulates straight into the output (one fused GEMM).</summary>
    public override Tensor? AddTo(Tensor accumulated, Tensor x, Tensor baseOutput, Tensor baseWeight, Tensor? baseBias, double multiplier, bool training, bool inPlace = false)
    {
        if (Dora != DoraKind.None || accumulated.dtype != Dt || x.dtype != Dt)
            return base.AddTo(accumulated, x, baseOutput, baseWeight, baseBias, multiplier, training, inPlace);
        if (SkippedByModuleDropout(training)) return null;
        if (training && Dropout.Input > 0) x = nn.functional.dropout(x, Dropout.Input, true);
        return LoraBranch.AddForward(accumulated, x, P(Down), P(Up), Pn(Mid), Scale * multiplier, Geometry, Dropout, training, inPlace);
    }
}

/// <summary>The LoRA branch with kohya's network and rank dropouts on the down output.</summary>
static class LoraBranch
{
    public static Tensor Forward(Tensor x, Tensor down, Tensor up, Tensor? mid, double scale, LayerGeometry g, AdapterDropout drop, bool training)
    {
        using var scope = NewDisposeScope();
        var h = Hidden(x, down, mid, g, drop, training, ref scale);
        return LoraMath.Up(h, up, g).mul(scale).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// acc + scale·up(h): for Linear one addmm (the GEMM accumulates into acc itself when <paramref name="inPlace"/>, else
    /// into a copy), for Conv2d an add.
    /// </summary>
    public static Tensor AddForward(Tensor acc, Tensor x, Tensor down, Tensor up, Tensor? mid, double scale, LayerGeometry g, AdapterDropout drop, bool training, bool inPlace = false)
    {
        using var scope = NewDisposeScope();
        var h = Hidden(x, down, mid, g, drop, training, ref scale);
        Tensor r;
        if (g.IsConv)
        {
            var d = LoraMath.Up(h.mul(scale), up, g);
            r = inPlace ? acc.add_(d) : acc.add(d);
        }
        else
        {
            long o = g.OutFeatures, rank = h.shape[^1];
            // addmm's alpha is a float32: exact enough below fp64; fp64 scales the small [N, r] activation instead
            var h2 = h.reshape(-1, rank);
            float alpha = (float)scale;
            if (acc.dtype == ScalarType.Float64) { h2 = h2.mul(scale); alpha = 1; }
            var upT = up.reshape(o, rank).t();
            if (inPlace && acc.is_contiguous())
            {
                acc.view(-1, o).addmm_(h2, upT, 1, alpha);
                r = acc;
            }
            else r = addmm(acc.reshape(-1, o), h2, upT, 1, alpha).reshape(acc.shape);
        }
        return r.MoveToOuterDisposeScope();
    }

    static Tensor Hidden(Tensor x, Tensor down, Tensor? mid, LayerGeometry g, AdapterDropout drop, bool training, ref double scale)
    {
        var h = LoraMath.Down(x, down, mid, g);
        if (training && drop.Network > 0) h = nn.functional.dropout(h, drop.Network, true);
        if (training && drop.Rank > 0)
        {
            long r = down.shape[0];
            var mask = rand([h.shape[0], r], dtype: h.dtype, device: h.device).gt(drop.Rank).to(h.dtype);
            long[] shape = g.IsConv ? [h.shape[0], r, 1, 1] : [h.shape[0], .. Enumerable.Repeat(1L, (int)h.dim() - 2), r];
            h = h.mul(mask.reshape(shape));
            scale *= 1.0 / (1.0 - drop.Rank);
        }
        return h;
    }
}

/// <summary>LyCORIS LoHa: hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, optional hada_t1, hada_t2.</summary>
public sealed class LohaAdapter : Adapter
{
    public LohaAdapter(string modulePath, LayerGeometry geometry, Tensor w1a, Tensor w1b, Tensor w2a, Tensor w2b, Tensor? t1, Tensor? t2,
        double? alpha, bool rsLora, ScaleConvention convention = ScaleConvention.LyCORIS, bool trainable = false)
        : base(modulePath, geometry, alpha, rsLora, convention)
    {
        using (NewDisposeScope()) LohaMath.DeltaWeight(w1a.detach(), w1b.detach(), w2a.detach(), w2b.detach(), t1?.detach(), t2?.detach(), 1, geometry);
        Scale = LoraMath.Scale(alpha, LohaMath.Rank(w1b), rsLora);
        W1a = AddParameter("hada_w1_a", w1a, trainable);
        W1b = AddParameter("hada_w1_b", w1b, trainable);
        W2a = AddParameter("hada_w2_a", w2a, trainable);
        W2b = AddParameter("hada_w2_b", w2b, trainable);
        if (t1 is not null) T1 = AddParameter("hada_t1", t1, trainable);
        if (t2 is not null) T2 = AddParameter("hada_t2", t2, trainable);
    }

    public Parameter W1a { get; }
    public Parameter W1b { get; }
    public Parameter W2a { get; }
    public Parameter W2b { get; }
    public Parameter? T1 { get; }
    public Parameter? T2 { get; }
    public override AdapterAlgorithm Algorithm => AdapterAlgorithm.LoHa;
    public override double Scale { get; }
    public override long Rank => W1b.shape[0];

    public override Tensor DeltaWeight() => LohaMath.DeltaWeight(P(W1a), P(W1b), P(W2a), P(W2b), Pn(T1), Pn(T2), Scale, Geometry);

    public override Tensor Bypass(Tensor x, bool training)
    {
        using var scope = NewDisposeScope();
        return Geometry.Apply(x, DeltaWeightForTraining(training)).MoveToOuterDisposeScope();
    }
}

/// <summary>LyCORIS LoKr: lokr_w1 | lokr_w1_a+lokr_w1_b, lokr_w2 | lokr_w2_a+lokr_w2_b, optional lokr_t2.</summary>
public sealed class LokrAdapter : Adapter
{
    public LokrAdapter(string modulePath, LayerGeometry geometry, Tensor? w1, Tensor? w1a, Tensor? w1b, Tensor? w2, Tensor? w2a, Tensor? w2b,
        Tensor? t2, double? alpha, bool rsLora, ScaleConvention convention, long? configuredRank = null, bool trainable = false)
        : base(modulePath, geometry, alpha, rsLora, convention)
    {
        if ((w1 is null) == (w1a is null || w1b is null))
            throw new ArgumentException($"Module '{modulePath}': LoKr needs exactly one of lokr_w1 or lokr_w1_a + lokr_w1_b.");
        if ((w2 is null) == (w2a is null || w2b is null))
            throw new ArgumentException($"Module '{modulePath}': LoKr needs exactly one of lokr_w2 or lokr_w2_a + lokr_w2_b.");
        using (NewDisposeScope()) LokrMath.DeltaWeight(w1?.detach(), w1a?.detach(), w1b?.detach(), w2?.detach(), w2a?.detach(), w2b?.detach(), t2?.detach(), 1, geometry);
        long? decomposed = w1b is not null ? w1b.shape[0] : w2b?.shape[0];
        _rank = decomposed ?? configuredRank ?? 0;
        Scale = LokrMath.Scale(alpha, decomposed, configuredRank, rsLora, convention);
        if (w1 is not null) W1 = AddParameter("lokr_w1", w1, trainable);
        else { W1a = AddParameter("lokr_w1_a", w1a!, trainable); W1b = AddParameter("lokr_w1_b", w1b!, trainable); }
        if (w2 is not null) W2 = AddParameter("lokr_w2", w2, trainable);
        else { W2a = AddParameter("lokr_w2_a", w2a!, trainable); W2b = AddParameter("lokr_w2_b", w2b!, trainable); }
        if (t2 is not null) T2 = AddParameter("lokr_t2", t2, trainable);
    }

    readonly long _rank;
    public Parameter? W1 { get; }
    public Parameter? W1a { get; }
    public Parameter? W1b { get; }
    public Parameter? W2 { get; }
    public Parameter? W2a { get; }
    public Parameter? W2b { get; }
    public Parameter? T2 { get; }
    public override AdapterAlgorithm Algorithm => AdapterAlgorithm.LoKr;
    public override double Scale { get; }
    public override long Rank => _rank;

    public override Tensor DeltaWeight() => LokrMath.DeltaWeight(Pn(W1), Pn(W1a), Pn(W1b), Pn(W2), Pn(W2a), Pn(W2b), Pn(T2), Scale, Geometry);

    public override Tensor Bypass(Tensor x, bool training)
    {
        using var scope = NewDisposeScope();
        return Geometry.Apply(x, DeltaWeightForTraining(training)).MoveToOuterDisposeScope();
    }
}

/// <summary>Full weight difference: diff, optional diff_b.</summary>
public sealed class FullAdapter : Adapter
{
    public FullAdapter(string modulePath, LayerGeometry geometry, Tensor diff, Tensor? diffBias, bool trainable = false)
        : base(modulePath, geometry, null, false, ScaleConvention.LyCORIS)
    {
        using (NewDisposeScope()) FullMath.DeltaWeight(diff.detach(), geometry);
        if (diffBias is not null && diffBias.numel() != geometry.OutFeatures)
            throw new ArgumentException($"Module '{modulePath}': diff_b has {diffBias.numel()} values, expected {geometry.OutFeatures}.");
        Diff = AddParameter("diff", diff, trainable);
        if (diffBias is not null) DiffBias = AddParameter("diff_b", diffBias.reshape(geometry.OutFeatures), trainable);
    }

    public Parameter Diff { get; }
    public Parameter? DiffBias { get; }
    public override AdapterAlgorithm Algorithm => AdapterAlgorithm.Full;
    public override double Scale => 1.0;
    public override long Rank => Math.Min(Geometry.OutFeatures, Geometry.FanIn);

    public override Tensor DeltaWeight() => FullMath.DeltaWeight(P(Diff), Geometry);

    public override Tensor? DeltaBias() => DiffBias is null ? null : P(DiffBias);

    public override Tensor Bypass(Tensor x, bool training)
    {
        using var scope = NewDisposeScope();
        return Geometry.Apply(x, DeltaWeightForTraining(training)).MoveToOuterDisposeScope();
    }
}
