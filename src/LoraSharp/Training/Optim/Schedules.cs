namespace LoraSharp.Training.Optim;

/// <summary>Learning-rate schedule shapes (the names of diffusers' and transformers' <c>get_scheduler</c>).</summary>
public enum LrScheduleKind
{
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    CosineWithRestarts,
    Polynomial,
}

/// <summary>
/// The learning-rate factor per optimizer step (counted from 0) of diffusers' / transformers' schedulers, which kohya
/// (<c>get_scheduler_fix</c>), Axolotl and the demo pretrainer use. During the warm-up (every kind but
/// <see cref="LrScheduleKind.Constant"/>, which ignores it as <c>get_constant_schedule</c> does) the factor is
/// step/warmup; after it, with progress = (step − warmup)/(total − warmup):
/// <list type="bullet">
/// <item>constant_with_warmup: 1;</item>
/// <item>linear: (total − step)/(total − warmup), at least 0;</item>
/// <item>cosine: ½(1 + cos(π·progress)), at least 0 (diffusers' num_cycles = 0.5);</item>
/// <item>cosine_with_restarts: ½(1 + cos(π·((cycles·progress) mod 1))), 0 once progress ≥ 1 (hard restarts);</item>
/// <item>polynomial: ((lr_init − lr_end)·(1 − progress)^power + lr_end)/lr_init, lr_end/lr_init after the last step,
/// with lr_end = 1e-7 absolute and lr_init the optimizer's default learning rate.</item>
/// </list>
/// </summary>
public sealed record LrSchedule(LrScheduleKind Kind, long WarmupSteps, long TotalSteps)
{
    /// <summary>cosine_with_restarts: number of hard restarts (kohya's lr_scheduler_num_cycles).</summary>
    public int NumCycles { get; init; } = 1;
    /// <summary>polynomial: the power (kohya's lr_scheduler_power).</summary>
    public double Power { get; init; } = 1.0;
    /// <summary>polynomial: the final learning rate (diffusers' lr_end, absolute).</summary>
    public double LrEnd { get; init; } = 1e-7;
    /// <summary>polynomial: the optimizer's default learning rate (diffusers' lr_init), against which <see cref="LrEnd"/> is a factor.</summary>
    public double InitialLearningRate { get; init; } = 1.0;

    /// <summary>The names accepted by <see cref="Parse"/>, in the order of <see cref="LrScheduleKind"/>.</summary>
    public static IReadOnlyList<string> Names { get; } = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"];

    /// <summary>The learning-rate factor (multiply the base learning rate) for optimizer step <paramref name="step"/> (0-based).</summary>
    public double Factor(long step)
    {
        if (Kind == LrScheduleKind.Constant) return 1;
        if (step < WarmupSteps) return (double)step / Math.Max(1, WarmupSteps);
        double decaySteps = Math.Max(1, TotalSteps - WarmupSteps);
        double progress = (step - WarmupSteps) / decaySteps;
        switch (Kind)
        {
            case LrScheduleKind.ConstantWithWarmup:
                return 1;
            case LrScheduleKind.Linear:
                return Math.Max(0, (TotalSteps - step) / decaySteps);
            case LrScheduleKind.Cosine:
                return Math.Max(0, 0.5 * (1 + Math.Cos(Math.PI * progress)));
            case LrScheduleKind.CosineWithRestarts:
                return progress >= 1 ? 0 : Math.Max(0, 0.5 * (1 + Math.Cos(Math.PI * (NumCycles * progress % 1.0))));
            default:
                if (step > TotalSteps) return LrEnd / InitialLearningRate;
                return ((InitialLearningRate - LrEnd) * Math.Pow(1 - progress, Power) + LrEnd) / InitialLearningRate;
        }
    }

    /// <summary>
    /// A schedule by its name, with the checks diffusers makes (polynomial needs <paramref name="initialLearningRate"/> &gt; lr_end).
    /// </summary>
    public static LrSchedule Create(string name, long warmupSteps, long totalSteps, double initialLearningRate = 1.0, int numCycles = 1, double power = 1.0)
    {
        var kind = Parse(name);
        if (warmupSteps < 0) throw new LoraSharpException($"warm-up steps must not be negative, got {warmupSteps}", key: "lr_warmup_steps");
        var schedule = new LrSchedule(kind, warmupSteps, totalSteps) { NumCycles = numCycles, Power = power, InitialLearningRate = initialLearningRate };
        if (kind == LrScheduleKind.Polynomial && !(initialLearningRate > schedule.LrEnd))
            throw new LoraSharpException($"the polynomial schedule decays to lr_end {schedule.LrEnd:G3}; the learning rate ({initialLearningRate:G3}) must be larger", key: "learning_rate");
        return schedule;
    }

    /// <summary>The kind for a scheduler name (case-insensitive).</summary>
    public static LrScheduleKind Parse(string name)
    {
        int i = Names.ToList().IndexOf(name.Trim().ToLowerInvariant());
        return i >= 0 ? (LrScheduleKind)i
            : throw new LoraSharpException($"unknown lr_scheduler '{name}' (expected one of: {string.Join(", ", Names)})", key: "lr_scheduler");
    }

    /// <summary>The scheduler name of a kind (as written in configs and metadata).</summary>
    public static string NameOf(LrScheduleKind kind) => Names[(int)kind];

    /// <summary>kohya's lr_warmup_steps: a value below 1 is a ratio of the total steps (truncated, as Python's int()); otherwise a step count.</summary>
    public static long KohyaWarmupSteps(double value, long totalSteps) =>
        value < 1 ? (long)Math.Floor(value * totalSteps) : (long)value;

    /// <summary>Hugging Face Trainer's warm-up: warmup_steps when given, else ⌈warmup_ratio · total⌉.</summary>
    public static long HuggingFaceWarmupSteps(long? warmupSteps, double? warmupRatio, long totalSteps) =>
        warmupSteps ?? (long)Math.Ceiling((warmupRatio ?? 0) * totalSteps);
}
