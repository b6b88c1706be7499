using LoraSharp.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Diffusion;

public class SamplerBehaviourTests
{
    static readonly float[] Trailing20 = Enumerable.Range(0, 20).Select(k => 999f - 50 * k).ToArray();

    [Fact]
    public void Dpmpp_2m_linspace_timesteps_follow_diffusers()
    {
        var s = new DpmSolverMultistepSampler(20);
        float[] expected = [999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450, 400, 350, 300, 250, 200, 150, 100, 50];
        Assert.Equal(expected, s.Timesteps);
        Assert.Equal(21, s.Sigmas!.Count);
        Assert.Equal(0f, s.Sigmas[^1]);
        Assert.Equal("DPM++ 2M", s.Name);
    }

    [Fact]
    public void Trailing_spacing_ends_at_the_last_training_step()
    {
        var config = ScheduleConfig.StableDiffusion with { Spacing = TimestepSpacing.Trailing };
        Assert.Equal(Trailing20, new DdimSampler(20, config).Timesteps);
        Assert.Equal(Trailing20, new EulerSampler(20, config).Timesteps);
        Assert.Equal(Trailing20, new DpmSolverMultistepSampler(20, config).Timesteps);
    }

    [Fact]
    public void Leading_spacing_euler_uses_sqrt_sigma_max_squared_plus_one()
    {
        var s = new EulerSampler(20, ScheduleConfig.StableDiffusion with { Spacing = TimestepSpacing.Leading });
        Assert.Equal(951f, s.Timesteps[0]);
        Assert.Equal(1f, s.Timesteps[^1]);
        double max = s.Sigmas!.Max();
        Assert.Equal(Math.Sqrt(max * max + 1), s.InitNoiseSigma, 1e-9);
    }

    [Theory]
    [InlineData("Euler", typeof(EulerSampler))]
    [InlineData("euler_a", typeof(EulerSampler))]
    [InlineData("DDIM", typeof(DdimSampler))]
    [InlineData("DPM++ 2M", typeof(DpmSolverMultistepSampler))]
    [InlineData("dpm++ 2m karras", typeof(DpmSolverMultistepSampler))]
    public void Samplers_are_created_by_a1111_name_or_id(string name, Type type)
    {
        var s = Samplers.Create(name, 10);
        Assert.IsType(type, s);
        Assert.Equal(10, s.Timesteps.Count);
    }

    [Fact]
    public void Unknown_sampler_lists_the_supported_ones()
    {
        var e = Assert.Throws<LoraSharpException>(() => Samplers.Create("LMS", 20));
        Assert.Contains("DPM++ 2M Karras", e.Message);
    }

    [Fact]
    public void Invalid_step_count_is_refused() =>
        Assert.Throws<LoraSharpException>(() => new EulerSampler(0));

    [Fact]
    public void Multistep_sampler_refuses_out_of_order_steps()
    {
        using var scope = NewDisposeScope();
        var s = new DpmSolverMultistepSampler(5);
        var x = randn(1, 4, 2, 2);
        s.Step(zeros_like(x), 0, x);
        Assert.Throws<InvalidOperationException>(() => s.Step(zeros_like(x), 2, x));
        s.Step(zeros_like(x), 0, x); // step 0 restarts
        s.Step(zeros_like(x), 1, x);
    }

    /// <summary>
    /// For a sample x at step i built from a clean x0 and noise ε, a v-prediction model outputs
    /// v = α·ε − s·x0 (α = √ᾱ, s = √(1−ᾱ); for σ-parameterized samplers ᾱ = 1/(σ²+1)). Every sampler must
    /// take the same step from v as from ε.
    /// </summary>
    [Theory]
    [InlineData("euler")]
    [InlineData("euler_a")]
    [InlineData("ddim")]
    [InlineData("dpmpp_2m")]
    [InlineData("dpmpp_2m_karras")]
    public void V_prediction_steps_agree_with_epsilon_steps(string name)
    {
        using var scope = NewDisposeScope();
        var eps = Samplers.Create(name, 8);
        var vpred = Samplers.Create(name, 8, ScheduleConfig.StableDiffusion with { Prediction = PredictionType.VPrediction });
        var gen = new Generator(3);
        var x0 = randn([1, 4, 8, 8], generator: gen);
        var acp = ScheduleConfig.StableDiffusion.AlphasCumprod();
        var xe = eps.InitialLatents([1, 4, 8, 8], new RecordedNoise([randn([1, 4, 8, 8], generator: gen)]), ScalarType.Float32, CPU);
        var xv = xe.clone();
        for (int i = 0; i < 8; i++)
        {
            var noise = randn([1, 4, 8, 8], generator: gen);
            double alphaBar = eps.Sigmas is { } sig ? 1 / (sig[i] * (double)sig[i] + 1) : acp[(int)eps.Timesteps[i]];
            double a = Math.Sqrt(alphaBar), s = Math.Sqrt(1 - alphaBar);
            // the ε a perfect model would predict for xe given x0, and the matching v
            var scaled = eps.Sigmas is null ? xe : eps.ScaleModelInput(xe, i);
            var e = (scaled - a * x0) / s;
            var v = a * e - s * x0;
            var ancestral = randn([1, 4, 8, 8], generator: gen);
            xe = eps.Step(e, i, xe, new RecordedNoise([ancestral]));
            xv = vpred.Step(v, i, xv, new RecordedNoise([ancestral]));
            double diff = (xe - xv).abs().max().item<float>();
            Assert.True(diff < 1e-3 * Math.Max(1, xe.abs().max().item<float>()), $"step {i}: |eps - v| = {diff}");
            _ = noise;
        }
    }

    [Fact]
    public void Same_seed_gives_the_same_latents_and_different_seeds_differ()
    {
        using var scope = NewDisposeScope();
        var s = new EulerSampler(20);
        using var g1 = new GeneratorNoise(42);
        using var g2 = new GeneratorNoise(42);
        using var g3 = new GeneratorNoise(43);
        var a = s.InitialLatents([1, 4, 8, 8], g1, ScalarType.Float32, CPU);
        var b = s.InitialLatents([1, 4, 8, 8], g2, ScalarType.Float32, CPU);
        var c = s.InitialLatents([1, 4, 8, 8], g3, ScalarType.Float32, CPU);
        Assert.Equal(0f, (a - b).abs().max().item<float>());
        Assert.True((a - c).abs().max().item<float>() > 0.1f);
        Assert.Equal(s.InitNoiseSigma, a.std().item<float>(), 1.5);
    }

    [Fact]
    public void Guidance_applies_cfg_formula()
    {
        using var scope = NewDisposeScope();
        var u = tensor(new float[] { 1, 2 });
        var c = tensor(new float[] { 3, 2 });
        Assert.Equal(new float[] { 15, 2 }, Guidance.Apply(u, c, 7).data<float>().ToArray());
        Assert.Equal(new float[] { 15, 2 }, Guidance.ApplyBatched(stack([u, c]), 7)[0].data<float>().ToArray());
    }

    [Fact]
    public void Sampler_loop_does_not_leak_tensors()
    {
        var s = new DpmSolverMultistepSampler(20, karras: true);
        using var outer = NewDisposeScope();
        var x = randn(1, 4, 8, 8);
        long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        for (int i = 0; i < 20; i++)
        {
            using var step = NewDisposeScope();
            var eps = randn(1, 4, 8, 8);
            var next = s.Step(eps, i, s.ScaleModelInput(x, i));
            x.Dispose();
            x = next.MoveToOuterDisposeScope();
        }
        long after = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        Assert.True(after - before <= 2, $"live tensors grew by {after - before}");
    }
}
