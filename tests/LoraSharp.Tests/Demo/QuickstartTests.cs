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
    [Fact]
    public void Quickstart_trains_a_lora_that_changes_the_demo_models_images_and_writes_the_grid()
    {
        using var dir = new TempDir();
        int threads = get_num_threads();
        set_num_threads(1);
        try
        {
            var qs = new Quickstart(new QuickstartOptions { Root = Quickstart.FindRoot(), OutputDir = dir.Path, MaxTrainSteps = 40, SeedsPerPrompt = 2 }, output.WriteLine);
            var r = qs.Run();
            output.WriteLine($"{r.Base} / {r.Lora}; train {r.TrainTime.TotalSeconds:0} s, eval {r.EvalTime.TotalSeconds:0} s");
            Assert.Equal(40, r.Steps);
            Assert.True(File.Exists(r.AdapterPath));
            Assert.True(File.Exists(r.GridPath));
            Assert.Equal(8, r.Base.Images);
            Assert.Equal(8, r.Lora.Images);
            Assert.True(r.MeanAbsoluteDifference > 0.01, $"the LoRA did not change the images (mean |Δ| {r.MeanAbsoluteDifference})");
        }
        finally
        {
            set_num_threads(threads);
        }
    }

    [Fact(Skip = "Not yet achieved: the committed demo model's VAE cannot render a star (a VAE round trip of 50 drawn stars reads 0 % as stars, see docs/quickstart.md); re-enable after a longer pretraining")]
    public void Quickstart_lora_raises_the_held_out_star_rate_from_near_zero_to_a_majority()
    {
        using var dir = new TempDir();
        int threads = get_num_threads();
        // One thread: on a crowded machine libtorch's OpenMP threads wait on each other; the model is tiny.
        set_num_threads(1);
        try
        {
            var qs = new Quickstart(new QuickstartOptions
            {
                Root = Quickstart.FindRoot(),
                OutputDir = dir.Path,
                MaxTrainSteps = 200,
                SeedsPerPrompt = 4,
            }, output.WriteLine);
            var r = qs.Run();
            output.WriteLine($"{r.Base} / {r.Lora}; train {r.TrainTime.TotalSeconds:0} s, eval {r.EvalTime.TotalSeconds:0} s");
            Assert.True(File.Exists(r.AdapterPath));
            Assert.True(File.Exists(r.GridPath));
            Assert.Equal(16, r.Base.Images);
            Assert.True(r.Base.Rate <= 0.2, $"base model drew stars too often: {r.Base}");
            Assert.True(r.Lora.Rate >= 0.6, $"the LoRA did not teach the star: {r.Lora}");
        }
        finally
        {
            set_num_threads(threads);
        }
    }
}
