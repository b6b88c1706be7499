using LoraSharp.Demo;
using LoraSharp.Diffusion;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Tests.Infrastructure;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Demo;

public class DemoPretrainerTests
{
    [Fact]
    public void Latent_standardisation_gives_unit_scaled_latents_and_leaves_decoding_unchanged()
    {
        manual_seed(2);
        var config = DemoModel.Config(300).Vae!;
        using var vae = new AutoencoderKL(config);
        vae.eval();
        var (pixels, _) = ShapeScenes.Batch(64, DemoModel.ImageSize, 3, ShapeScenes.PretrainingShapes);
        using var _p = pixels;
        using var noGrad = no_grad();
        using var x = ShapeScenes.ToUnit(pixels);
        using var before = vae.Encode(x);
        using var decodedBefore = vae.Decode(before.Mean);
        var std = DemoPretrainer.Standardize(vae, pixels, CPU);
        Assert.Equal(4, std.Length);
        using var after = vae.Encode(x);
        using var scaled = after.Mean * config.ScalingFactor;
        using var m = scaled.mean([0, 2, 3]);
        using var s = scaled.std([0, 2, 3]);
        Assert.True(m.abs().max().item<float>() < 1e-3, "channel means are not 0");
        Assert.True((s - 1).abs().max().item<float>() < 1e-3, "channel stds are not 1");
        using var decodedAfter = vae.Decode(after.Mean);
        Assert.True((decodedAfter - decodedBefore).abs().max().item<float>() < 1e-4, "decoding changed");
        // The posterior std scales with the mean: std' = k · std.
        using var ratio = after.Std / before.Std;
        using var k = 1.0 / (config.ScalingFactor * tensor(std.Select(v => (float)v).ToArray()));
        Assert.True((ratio.mean([0, 2, 3]) - k).abs().max().item<float>() < 1e-3 * k.max().item<float>());
    }

    [Fact]
    public void A_tiny_pretraining_run_writes_a_checkpoint_the_pipeline_loads()
    {
        using var dir = new TempDir();
        var path = dir.File("demo.safetensors");
        var progress = new List<DemoPretrainProgress>();
        var trainer = new DemoPretrainer(new DemoPretrainOptions { Images = 64, VaeSteps = 3, VaeBatch = 4, UnetSteps = 3, UnetBatch = 4 });
        trainer.Progress += progress.Add;
        var r = trainer.Run(path);
        Assert.Equal(3, progress.Count(p => p.Stage == "vae"));
        Assert.Equal(3, progress.Count(p => p.Stage == "unet"));
        Assert.True(double.IsFinite(r.VaeFinalLoss) && double.IsFinite(r.UnetFinalLoss));
        Assert.True(File.Exists(r.LossCurvePath) && File.Exists(r.VaeLossCurvePath));
        using var pipeline = Txt2ImgPipeline.Load(path);
        Assert.Equal(StableDiffusionFamily.SD1, pipeline.Model.Family);
        using var result = pipeline.Generate(new Txt2ImgRequest { Prompt = "a red circle on a blue background, left", Steps = 2, Seed = 1, Width = 32, Height = 32, Sampler = "DDIM" });
        Assert.Equal(new long[] { 1, 3, 32, 32 }, result.Images!.shape);
        Assert.Contains("lorasharp demo pretrain-image --seed 1", ReadMeta(path));
    }

    static string ReadMeta(string path)
    {
        using var f = LoraSharp.IO.SafetensorsFile.Open(path);
        return f.Metadata["lorasharp_demo_command"];
    }
}
