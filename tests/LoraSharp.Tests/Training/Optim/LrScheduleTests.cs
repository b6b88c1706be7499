using LoraSharp.Training.Optim;

namespace LoraSharp.Tests.Training.Optim;

/// <summary>The one LR-schedule implementation against diffusers' / transformers' formulas, one test per kohya scheduler name.</summary>
public class LrScheduleTests
{
    static double F(string name, long step, long warmup, long total, double lr = 1.0, int cycles = 1, double power = 1.0) =>
        LrSchedule.Create(name, warmup, total, lr, cycles, power).Factor(step);

    [Fact]
    public void Constant_ignores_the_warmup()
    {
        Assert.Equal(1, F("constant", 0, 10, 100));
        Assert.Equal(1, F("constant", 5, 10, 100));
        Assert.Equal(1, F("constant", 99, 10, 100));
    }

    [Fact]
    public void Constant_with_warmup_ramps_linearly_from_zero_then_stays_at_one()
    {
        Assert.Equal(0, F("constant_with_warmup", 0, 10, 100));
        Assert.Equal(0.5, F("constant_with_warmup", 5, 10, 100));
        Assert.Equal(1, F("constant_with_warmup", 10, 10, 100));
        Assert.Equal(1, F("constant_with_warmup", 500, 10, 100));
    }

    [Fact]
    public void Linear_decays_to_zero_at_the_last_step()
    {
        Assert.Equal(0.5, F("linear", 5, 10, 110), 12);
        Assert.Equal(1.0, F("linear", 10, 10, 110), 12);
        Assert.Equal(0.5, F("linear", 60, 10, 110), 12);
        Assert.Equal(0.0, F("linear", 110, 10, 110), 12);
        Assert.Equal(0.0, F("linear", 200, 10, 110), 12);
    }

    [Fact]
    public void Cosine_is_half_a_cosine_after_the_warmup()
    {
        Assert.Equal(0.0, F("cosine", 0, 10, 110));
        Assert.Equal(1.0, F("cosine", 10, 10, 110), 12);
        Assert.Equal(0.5 * (1 + Math.Cos(Math.PI / 4)), F("cosine", 35, 10, 110), 12);
        Assert.Equal(0.5, F("cosine", 60, 10, 110), 12);
        Assert.Equal(0.0, F("cosine", 110, 10, 110), 12);
        // past the end diffusers does not clamp the progress: the cosine rises again
        Assert.Equal(0.5 * (1 + Math.Cos(Math.PI * 2.9)), F("cosine", 300, 10, 110), 12);
    }

    [Fact]
    public void Cosine_with_restarts_restarts_num_cycles_times_and_ends_at_zero()
    {
        Assert.Equal(1.0, F("cosine_with_restarts", 0, 0, 100, cycles: 2), 12);
        Assert.Equal(0.5, F("cosine_with_restarts", 25, 0, 100, cycles: 2), 12);
        Assert.Equal(0.5 * (1 + Math.Cos(Math.PI * 0.98)), F("cosine_with_restarts", 49, 0, 100, cycles: 2), 12);
        Assert.Equal(1.0, F("cosine_with_restarts", 50, 0, 100, cycles: 2), 12);
        Assert.Equal(0.5, F("cosine_with_restarts", 75, 0, 100, cycles: 2), 12);
        Assert.Equal(0.0, F("cosine_with_restarts", 100, 0, 100, cycles: 2), 12);
        // one cycle = plain cosine
        Assert.Equal(F("cosine", 37, 5, 100), F("cosine_with_restarts", 37, 5, 100), 12);
    }

    [Fact]
    public void Polynomial_decays_to_an_absolute_lr_end_of_1e_7()
    {
        // lr 1e-3: lr_end / lr_init = 1e-4
        Assert.Equal(0.5, F("polynomial", 5, 10, 110, lr: 1e-3, power: 2), 12);
        Assert.Equal(((1e-3 - 1e-7) * 0.25 + 1e-7) / 1e-3, F("polynomial", 60, 10, 110, lr: 1e-3, power: 2), 12);
        Assert.Equal(((1e-3 - 1e-7) * 0.5 + 1e-7) / 1e-3, F("polynomial", 60, 10, 110, lr: 1e-3, power: 1), 12);
        Assert.Equal(1e-4, F("polynomial", 110, 10, 110, lr: 1e-3), 12);
        Assert.Equal(1e-4, F("polynomial", 111, 10, 110, lr: 1e-3), 12);
        var e = Assert.Throws<LoraSharpException>(() => LrSchedule.Create("polynomial", 0, 100, initialLearningRate: 1e-7));
        Assert.Equal("learning_rate", e.Key);
    }

    [Fact]
    public void Warmup_is_a_ratio_below_one_for_kohya_and_rounds_up_for_hugging_face()
    {
        Assert.Equal(10, LrSchedule.KohyaWarmupSteps(0.1, 100));
        Assert.Equal(1, LrSchedule.KohyaWarmupSteps(0.05, 30)); // int(1.5)
        Assert.Equal(7, LrSchedule.KohyaWarmupSteps(7, 100));
        Assert.Equal(0, LrSchedule.KohyaWarmupSteps(0, 100));
        Assert.Equal(2, LrSchedule.HuggingFaceWarmupSteps(null, 0.05, 30)); // ceil(1.5)
        Assert.Equal(5, LrSchedule.HuggingFaceWarmupSteps(5, 0.5, 30));
        Assert.Equal(0, LrSchedule.HuggingFaceWarmupSteps(null, null, 30));
    }

    [Fact]
    public void Names_parse_case_insensitively_and_unknown_names_list_the_valid_ones()
    {
        foreach (var name in LrSchedule.Names) Assert.Equal(name, LrSchedule.NameOf(LrSchedule.Parse(name.ToUpperInvariant())));
        var e = Assert.Throws<LoraSharpException>(() => LrSchedule.Parse("cosine_annealing"));
        Assert.Contains("cosine_with_restarts", e.Message);
        Assert.Equal("lr_scheduler", e.Key);
    }
}
