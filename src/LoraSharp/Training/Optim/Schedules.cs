namespace LoraSharp.Training.Optim;

/// <summary>Learning-rate schedule shapes (Hugging Face <c>get_scheduler</c> names).</summary>
public enum LrScheduleKind
{
    Cosine,
    Linear,
    Constant,
}

/// <summary>
/// Learning rate per optimizer step, as Hugging Face's schedulers compute it (step counted from 0): linear warmup
/// <c>lr·step/warmup</c> for step &lt; warmup, then cosine <c>lr·½(1 + cos(π·progress))</c>, linear
/// <c>lr·(total − step)/(total − warmup)</c>, or constant <c>lr</c>, with progress = (step − warmup)/(total − warmup).
/// </summary>
public sealed record LrSchedule(LrScheduleKind Kind, double BaseLearningRate, long WarmupSteps, long TotalSteps)
{
    public double At(long step)
    {
        if (step < WarmupSteps) return BaseLearningRate * step / Math.Max(1, WarmupSteps);
        double decaySteps = Math.Max(1, TotalSteps - WarmupSteps);
        double progress = (step - WarmupSteps) / decaySteps;
        return Kind switch
        {
            LrScheduleKind.Cosine => BaseLearningRate * Math.Max(0, 0.5 * (1 + Math.Cos(Math.PI * progress))),
            LrScheduleKind.Linear => BaseLearningRate * Math.Max(0, (TotalSteps - step) / decaySteps),
            _ => BaseLearningRate,
        };
    }

    public static LrScheduleKind ParseKind(string name) => name.ToLowerInvariant() switch
    {
        "cosine" => LrScheduleKind.Cosine,
        "linear" => LrScheduleKind.Linear,
        "constant" or "constant_with_warmup" => LrScheduleKind.Constant,
        _ => throw new LoraSharpException($"unknown lr_scheduler '{name}' (expected cosine, linear or constant)", key: "lr_scheduler"),
    };
}
