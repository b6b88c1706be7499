using LoraSharp.Demo;
using LoraSharp.Tests.Infrastructure;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Demo;

/// <summary>Runs alone (it sets libtorch's thread count, a process-wide setting).</summary>
[CollectionDefinition("Demo quickstart", DisableParallelization = true)]
public class QuickstartCollection;

[Collection("Demo quickstart")]
public class QuickstartTests(ITestOutputHelper output)
{
    /// <summary>
    /// The README's first command as shipped (examples/quickstart/quickstart.toml: 1000 steps; 4 prompts × 6 seeds), on
    /// one thread: the base model never draws a star (≤ 1 of 24 allowed); with the LoRA the pixel statistic finds stars
    /// in a clear majority (≥ 16 of 24; measured 20).
    /// </summary>
    [Fact]
    public void Quickstart_lora_makes_the_demo_model_draw_stars_it_never_drew_before()
    {
        using var dir = new TempDir();
        int threads = get_num_threads();
        // One thread: on a crowded machine libtorch's OpenMP threads wait on each other; the model is tiny.
        set_num_threads(1);
        try
        {
            var qs = new Quickstart(new QuickstartOptions { Root = Quickstart.FindRoot(), OutputDir = dir.Path, SeedsPerPrompt = 6 }, output.WriteLine);
            var r = qs.Run();
            output.WriteLine($"{r.Base} / {r.Lora}; mean |Δ| {r.MeanAbsoluteDifference:0.000}; {r.Steps} steps in {r.TrainTime.TotalSeconds:0} s, eval {r.EvalTime.TotalSeconds:0} s");
            Assert.Equal(1000, r.Steps);
            Assert.True(File.Exists(r.AdapterPath));
            Assert.True(File.Exists(r.GridPath));
            Assert.True(r.LossCurvePath is not null && File.Exists(r.LossCurvePath));
            Assert.Equal(24, r.Base.Images);
            Assert.Equal(24, r.Lora.Images);
            Assert.True(r.Base.Stars <= 1, $"the base model drew stars: {r.Base}");
            Assert.True(r.Lora.Stars >= 16, $"the LoRA did not teach the star: {r.Lora}");
            Assert.True(r.MeanAbsoluteDifference > 0.1, $"the LoRA barely changed the images (mean |Δ| {r.MeanAbsoluteDifference})");

            // --lora FILE: the same evaluation of an existing adapter, without training, reads the same images
            using var dir2 = new TempDir();
            var again = new Quickstart(new QuickstartOptions { Root = Quickstart.FindRoot(), OutputDir = dir2.Path, SeedsPerPrompt = 6, AdapterPath = r.AdapterPath }, output.WriteLine).Run();
            Assert.Equal(0, again.Steps);
            Assert.Equal(r.Base, again.Base);
            Assert.Equal(r.Lora, again.Lora);
            Assert.Equal(r.MeanAbsoluteDifference, again.MeanAbsoluteDifference, 6);
        }
        finally
        {
            set_num_threads(threads);
        }
    }
}
