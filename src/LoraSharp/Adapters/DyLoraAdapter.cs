using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Adapters;

/// <summary>
/// DyLoRA (kohya <c>networks/dylora.py</c>): a LoRA whose ranks are stored as blocks of <see cref="Unit"/> ranks
/// (parameters lora_down_k / lora_up_k). Each training forward draws b uniformly from 0..r−1, rounded down to a
/// multiple of the unit; only block [b, b+unit) requires grad (the others are frozen for that step, so an
/// optimizer, which skips parameters without gradient, leaves them untouched), the forward uses all ranks and
/// multiplies the scale by √(r/(b+unit)). In eval it is a plain LoRA. After training, <see cref="DyLoraMath.Truncate(ModuleAdapterWeights,long)"/>
/// cuts the exported weights to any rank.
/// </summary>
public sealed class DyLoraAdapter : Adapter
{
    readonly List<Parameter> _downs = [];
    readonly List<Parameter> _ups = [];

    public DyLoraAdapter(string modulePath, LayerGeometry geometry, Tensor down, Tensor up, double? alpha, int unit, bool trainable = true)
        : base(modulePath, geometry, alpha, false, ScaleConvention.LyCORIS)
    {
        LoraMath.CheckShapes(down, up, null, geometry, $"Module '{modulePath}'");
        long r = down.shape[0];
        if (unit < 1 || r % unit != 0) throw new ArgumentException($"Module '{modulePath}': DyLoRA unit {unit} must divide the rank {r}.");
        Unit = unit;
        _rank = r;
        for (long k = 0; k < r / unit; k++)
        {
            _downs.Add(AddParameter($"lora_down_{k}", down.narrow(0, k * unit, unit).clone(), trainable));
            _ups.Add(AddParameter($"lora_up_{k}", up.narrow(1, k * unit, unit).clone(), trainable));
        }
        Scale = LoraMath.Scale(alpha, r, false);
    }

    readonly long _rank;
    public int Unit { get; }
    public override AdapterAlgorithm Algorithm => AdapterAlgorithm.LoRA;
    public override double Scale { get; }
    public override long Rank => _rank;

    /// <summary>The b of the last training forward (first rank of the block that was trainable).</summary>
    public long LastTrainableRank { get; private set; } = -1;

    /// <summary>For tests: force b instead of drawing it.</summary>
    public long? TrainableRankOverride { get; set; }

    /// <summary>
    /// TorchSharp's optimizer zero_grad leaves zero tensors, so AdamW would keep moving a frozen block with its
    /// momentum. A block whose gradient is all zero (left by zero_grad, not accumulated in this step) gets no gradient
    /// at all, as PyTorch's zero_grad(set_to_none=True) which kohya relies on.
    /// </summary>
    static void ClearZeroGrad(Parameter p)
    {
        using var g = p.grad;
        if (g is null) return;
        using var scope = NewDisposeScope();
        if (!g.any().item<bool>()) p.grad = null;
    }

    Tensor DownAll() => cat(_downs.Select(p => P(p)).ToArray(), 0);
    Tensor UpAll() => cat(_ups.Select(p => P(p)).ToArray(), 1);

    public override Tensor DeltaWeight()
    {
        using var scope = NewDisposeScope();
        return LoraMath.DeltaWeight(DownAll(), UpAll(), null, Scale, Geometry).MoveToOuterDisposeScope();
    }

    public override Tensor Bypass(Tensor x, bool training)
    {
        if (training && Dropout.Input > 0) x = nn.functional.dropout(x, Dropout.Input, true);
        return BypassNoInputDropout(x, training);
    }

    protected override Tensor BypassNoInputDropout(Tensor x, bool training)
    {
        using var scope = NewDisposeScope();
        double scale = Scale;
        if (training)
        {
            long b = TrainableRankOverride ?? randint(0, _rank, [1]).item<long>();
            b -= b % Unit;
            if (b < 0 || b >= _rank) throw new ArgumentOutOfRangeException(nameof(TrainableRankOverride), $"Trainable rank must be in 0..{_rank - 1}.");
            LastTrainableRank = b;
            long block = b / Unit;
            for (int k = 0; k < _downs.Count; k++)
            {
                _downs[k].requires_grad = k == block;
                _ups[k].requires_grad = k == block;
                if (k != block) { ClearZeroGrad(_downs[k]); ClearZeroGrad(_ups[k]); }
            }
            scale *= Math.Sqrt((double)_rank / (b + Unit));
        }
        return LoraBranch.Forward(x, DownAll(), UpAll(), null, scale, Geometry, Dropout, training).MoveToOuterDisposeScope();
    }

    /// <summary>Exported as an ordinary LoRA (lora_down/lora_up concatenated), as kohya's state_dict does.</summary>
    public override ModuleAdapterWeights ToWeights()
    {
        using var _ = no_grad();
        var tensors = new Dictionary<string, Tensor>
        {
            ["lora_down"] = cat(_downs.Select(p => (Tensor)p).ToArray(), 0).detach().clone(),
            ["lora_up"] = cat(_ups.Select(p => (Tensor)p).ToArray(), 1).detach().clone(),
        };
        return new ModuleAdapterWeights
        {
            ModulePath = ModulePath, Algorithm = AdapterAlgorithm.LoRA, Tensors = tensors, Alpha = Alpha ?? _rank,
        };
    }
}
