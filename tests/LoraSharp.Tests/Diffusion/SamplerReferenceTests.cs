using System.Text.Json.Nodes;
using LoraSharp.Diffusion;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Diffusion;

public class SamplerReferenceTests(Xunit.Abstractions.ITestOutputHelper output)
{
    const double ScheduleAtol = 1e-5;
    const double PerStepAtol = 1e-4;
    const double ChainAtol = 1e-3;

    static JsonObject Samplers() => ReferenceData.ReadJson("sd", "manifest.json")["samplers"]!.AsObject();

    public static TheoryData<string> Cases()
    {
        var data = new TheoryData<string>();
        foreach (var c in Samplers()["cases"]!.AsArray())
            data.Add((string)c!["name"]!);
        return data;
    }

    sealed record Case(string Name, ISampler Sampler, SafetensorsFile File, int Steps) : IDisposable
    {
        public Tensor T(string key) => File.Load(key, ScalarType.Float32);
        public void Dispose() { Sampler.Dispose(); File.Dispose(); }
    }

    static Case Open(string name)
    {
        var all = Samplers();
        var c = all["cases"]!.AsArray().Single(x => (string)x!["name"]! == name)!;
        var config = ScheduleConfig.FromJson(c["scheduler_config"]!.AsObject());
        int steps = (int)all["steps"]!;
        var sampler = LoraSharp.Diffusion.Samplers.Create(name, steps, config);
        var file = SafetensorsFile.Open(ReferenceData.PathOf("sd", (string)c["file"]!));
        return new Case(name, sampler, file, steps);
    }

    void AssertClose(Tensor expected, Tensor actual, double atol, string what)
    {
        Assert.Equal(expected.shape, actual.shape);
        double max = (expected - actual).abs().max().item<float>();
        output.WriteLine($"{what}: max |diff| = {max:g3}");
        Assert.True(max <= atol, $"{what}: max |diff| = {max:g3} > {atol:g3}");
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Sampler_timesteps_sigmas_and_init_noise_sigma_match_diffusers(string name)
    {
        using var scope = NewDisposeScope();
        using var c = Open(name);
        AssertClose(c.T("timesteps"), tensor(c.Sampler.Timesteps.ToArray()), ScheduleAtol, "timesteps");
        if (c.File.Contains("sigmas"))
            AssertClose(c.T("sigmas"), tensor(c.Sampler.Sigmas!.ToArray()), ScheduleAtol, "sigmas");
        Assert.Equal(c.T("init_noise_sigma").item<float>(), c.Sampler.InitNoiseSigma, 1e-5);
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Sampler_each_step_fed_recorded_inputs_reproduces_diffusers(string name)
    {
        using var scope = NewDisposeScope();
        using var c = Open(name);
        var preds = c.T("guided_noise_pred");
        var after = c.T("latents_after_step");
        var scaled = c.T("scaled_model_input");
        var noise = c.File.Contains("ancestral_noise") ? c.T("ancestral_noise") : null;
        var latents = c.T("initial_latents");
        for (int i = 0; i < c.Steps; i++)
        {
            var x = i == 0 ? latents : after[i - 1].unsqueeze(0);
            AssertClose(scaled[i].unsqueeze(0), c.Sampler.ScaleModelInput(x, i), PerStepAtol, $"scaled_model_input[{i}]");
            var source = noise is null ? null : new RecordedNoise([noise[i].unsqueeze(0)]);
            var next = c.Sampler.Step(preds[i].unsqueeze(0), i, x, source);
            AssertClose(after[i].unsqueeze(0), next, PerStepAtol, $"latents_after_step[{i}]");
        }
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Sampler_full_chain_from_initial_latents_reproduces_diffusers(string name)
    {
        using var scope = NewDisposeScope();
        using var c = Open(name);
        var preds = c.T("guided_noise_pred");
        var noise = c.File.Contains("ancestral_noise") ? c.T("ancestral_noise") : null;
        var source = noise is null ? null : new RecordedNoise(Enumerable.Range(0, c.Steps).Select(i => noise[i].unsqueeze(0)).ToList());
        var x = c.T("initial_latents");
        for (int i = 0; i < c.Steps; i++)
            x = c.Sampler.Step(preds[i].unsqueeze(0), i, x, source);
        AssertClose(c.T("latents_after_step")[c.Steps - 1].unsqueeze(0), x, ChainAtol, "final latents");
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Seeded_generator_reproduces_pytorch_initial_noise(string name)
    {
        using var scope = NewDisposeScope();
        using var c = Open(name);
        long seed = (long)Samplers()["generator_seed"]!;
        using var gen = new GeneratorNoise(seed);
        var latents = c.Sampler.InitialLatents([1, 4, 16, 16], gen, ScalarType.Float32, CPU);
        AssertClose(c.T("initial_latents"), latents, 1e-5, "initial_latents");
    }

    [Fact]
    public void Euler_a_with_seeded_generator_reproduces_the_recorded_ancestral_noise()
    {
        using var scope = NewDisposeScope();
        using var c = Open("euler_a");
        long seed = (long)Samplers()["generator_seed"]!;
        using var gen = new GeneratorNoise(seed);
        var preds = c.T("guided_noise_pred");
        var x = c.Sampler.InitialLatents([1, 4, 16, 16], gen, ScalarType.Float32, CPU);
        for (int i = 0; i < c.Steps; i++)
            x = c.Sampler.Step(preds[i].unsqueeze(0), i, x, gen);
        AssertClose(c.T("latents_after_step")[c.Steps - 1].unsqueeze(0), x, ChainAtol, "final latents");
    }
}
