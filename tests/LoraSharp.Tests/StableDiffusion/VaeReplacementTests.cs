using LoraSharp.Diffusion;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Tests.Infrastructure;
using static TorchSharp.torch;

namespace LoraSharp.Tests.StableDiffusion;

/// <summary>A standalone VAE replacing a checkpoint's (A1111 "SD VAE", kohya vae, generate --vae).</summary>
[Collection(LoraSharp.Tests.Training.LlmTraining.TorchGlobalStateCollection.Name)]
public class VaeReplacementTests
{
    static bool SameVae(StableDiffusionModel a, StableDiffusionModel b) =>
        a.Vae!.state_dict().All(kv => (kv.Value == b.Vae!.state_dict()[kv.Key]).all().item<bool>());

    [Fact]
    public void A_vae_file_replaces_the_vae_weights_and_leaves_the_rest()
    {
        using var tmp = new TempDir();
        var folder = SdReference.DiffusersDir("sd");
        using var model = StableDiffusionModel.FromDiffusers(folder);
        using var original = StableDiffusionModel.FromDiffusers(folder);
        manual_seed(21);
        using var other = new StableDiffusionModel(model.Config);
        var file = tmp.File("other.safetensors");
        StableDiffusionCheckpoint.Save(other, file); // ldm names under first_stage_model.
        Assert.False(SameVae(model, other));

        model.ReplaceVaeWeights(file);
        Assert.True(SameVae(model, other));
        Assert.True(model.Unet.state_dict().All(kv => (kv.Value == original.Unet.state_dict()[kv.Key]).all().item<bool>()));

        // a diffusers vae folder brings the original back
        model.ReplaceVaeWeights(Path.Combine(folder, "vae"));
        Assert.True(SameVae(model, original));

        // through the txt2img loader (generate --vae)
        using (var pipe = Txt2ImgPipeline.Load(folder, new Txt2ImgLoadOptions { VaePath = file, TokenizerFolder = ReferenceData.PathOf("sd", "tokenizer") }))
            Assert.True(SameVae(pipe.Model, other));

        // the trainer's vae option (kohya --vae): latents come from the replacement
        var trained = LoraSharp.Tests.Training.Diffusion.TrainerTests.OneThread(() =>
        {
            using var t = new LoraSharp.Training.Diffusion.SdTrainer(LoraSharp.Tests.Training.Diffusion.TrainerTests.Config(tmp, folder, "out", "--max_train_steps", "1", "--vae", file));
            t.Train();
            return SameVae(t.Pipeline.Model, other);
        });
        Assert.True(trained);

        // a VAE of another shape is refused naming the file and the key
        var demo = Path.Combine(ReferenceData.RepoRoot, "models", "demo", "demo-sd.safetensors");
        var e = Assert.Throws<LoraSharpException>(() => model.ReplaceVaeWeights(demo));
        Assert.Equal(demo, e.FilePath);
    }
}
