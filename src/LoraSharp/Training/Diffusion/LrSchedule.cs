namespace LoraSharp.Training.Diffusion;

/// <summary>
/// The learning-rate factor of diffusers' schedulers that kohya uses (get_scheduler): constant; constant_with_warmup;
/// linear (warm-up, then linear decay to 0); cosine (warm-up, then half a cosine to 0); cosine_with_restarts
/// (num_cycles hard restarts); polynomial (warm-up, then (1 − progress)^power down to lr_end = 1e-7 relative to the lr).
/// </summary>
public static class LrSchedule
{
    /// <summary>Factor for optimizer step <paramref name="step"/> (0-based) of <paramref name="total"/>.</summary>
    public static double Factor(string name, long step, long warmup, long total, int numCycles = 1, double power = 1.0, double lrEndRatio = 1e-7)
    {
        if (name == "constant") return 1;
        if (step < warmup) return (double)step / Math.Max(1, warmup);
        if (name == "constant_with_warmup") return 1;
        double progress = (double)(step - warmup) / Math.Max(1, total - warmup);
        return name switch
        {
            "linear" => Math.Max(0, (double)(total - step) / Math.Max(1, total - warmup)),
            "cosine" => Math.Max(0, 0.5 * (1 + Math.Cos(Math.PI * 0.5 * 2 * progress))),
            "cosine_with_restarts" => progress >= 1 ? 0 : Math.Max(0, 0.5 * (1 + Math.Cos(Math.PI * ((numCycles * progress) % 1.0)))),
            "polynomial" => step > total ? lrEndRatio : (1 - lrEndRatio) * Math.Pow(1 - progress, power) + lrEndRatio,
            _ => throw new LoraSharpException($"lr_scheduler '{name}' is not supported", key: "lr_scheduler"),
        };
    }

    /// <summary>kohya: a warm-up below 1 is a ratio of the total steps.</summary>
    public static long WarmupSteps(double value, long total) => value < 1 ? (long)Math.Ceiling(value * total) : (long)value;
}
