using LoraSharp.Adapters;
using static TorchSharp.torch;

namespace LoraSharp.Training.Diffusion;

/// <summary>What one max-norm pass did (kohya logs keys_scaled, average and max norm).</summary>
public sealed record MaxNormReport(int ModulesScaled, double MeanNorm, double MaxNorm);

/// <summary>
/// kohya's <c>scale_weight_norms</c> (networks.lora apply_max_norm_regularization), run after each optimizer step: for
/// every LoRA / LoCon module the Frobenius norm of its scaled update ΔW = (α/r)·up·down is capped at the limit by
/// multiplying up and down each by √(limit/‖ΔW‖).
/// </summary>
public static class MaxNormRegularization
{
    public static MaxNormReport Apply(IEnumerable<Adapter> adapters, double maxNorm)
    {
        if (maxNorm <= 0) throw new ArgumentOutOfRangeException(nameof(maxNorm), "the norm limit must be positive");
        using var noGrad = no_grad();
        int scaled = 0;
        var norms = new List<double>();
        foreach (var a in adapters.OfType<LoraAdapter>())
        {
            using var scope = NewDisposeScope();
            double norm = a.DeltaWeight().to_type(ScalarType.Float32).norm().item<float>();
            double ratio = norm > maxNorm ? maxNorm / norm : 1;
            if (ratio < 1)
            {
                scaled++;
                double root = Math.Sqrt(ratio);
                a.Up.mul_(root);
                a.Down.mul_(root);
            }
            norms.Add(norm * ratio);
        }
        return norms.Count == 0 ? new MaxNormReport(0, 0, 0) : new MaxNormReport(scaled, norms.Average(), norms.Max());
    }
}
