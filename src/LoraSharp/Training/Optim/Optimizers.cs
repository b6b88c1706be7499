using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Training.Optim;

/// <summary>
/// An optimizer whose state lives in tensors it owns (created on first use, updated in place under no_grad, so a
/// training step allocates only temporaries that die in its dispose scope). The state can be saved and restored exactly
/// (checkpoints, resume). Implemented by <see cref="GroupedOptimizer"/> (AdamW / AdamW8bit, Lion, Prodigy, Adafactor).
/// </summary>
public interface ITrainingOptimizer : IDisposable
{
    /// <summary>Learning rate of the next <see cref="Step"/> (set by the scheduler).</summary>
    double LearningRate { get; set; }

    /// <summary>Optimizer steps taken so far (the bias-correction step count).</summary>
    long StepCount { get; }

    /// <summary>One update from the parameters' current <c>.grad</c> (parameters without a gradient are skipped).</summary>
    void Step();

    /// <summary>Clears every gradient (the gradient tensors are released; the next backward creates them again).</summary>
    void ZeroGrad();

    /// <summary>The state tensors by name ("g&lt;group&gt;.p&lt;index&gt;.exp_avg", …) plus the step in "step" (int64 scalar).</summary>
    IReadOnlyDictionary<string, Tensor> State();

    /// <summary>Restores what <see cref="State"/> returned (copied into the owned tensors).</summary>
    void LoadState(IReadOnlyDictionary<string, Tensor> state);

    /// <summary>Bytes of all state tensors.</summary>
    long StateBytes { get; }
}

/// <summary>Global-norm gradient clipping (PyTorch <c>clip_grad_norm_</c>).</summary>
public static class GradientClipping
{
    /// <summary>Scales all gradients by min(1, max/(‖g‖ + 1e-6)); returns the norm before clipping.</summary>
    public static double ClipByGlobalNorm(IEnumerable<Parameter> parameters, double maxNorm)
    {
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var grads = parameters.Select(p => p.grad).Where(g => g is not null).Select(g => g!).ToList();
        if (grads.Count == 0) return 0;
        var total = torch.stack(grads.Select(g => g.to_type(ScalarType.Float32).norm()).ToArray()).norm().item<float>();
        if (maxNorm > 0 && double.IsFinite(total))
        {
            double coef = Math.Min(1.0, maxNorm / (total + 1e-6));
            if (coef < 1.0) foreach (var g in grads) g.mul_(coef);
        }
        return total;
    }
}
