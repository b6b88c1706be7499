using System.Security.Cryptography;
using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Training.Diffusion;
using SkiaSharp;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Training.Diffusion;

/// <summary>
/// End-to-end learning check on the tiny SD-shaped reference model (random weights): a LoCon trained on a few synthetic
/// stripe images lowers the held-out denoising loss on that pattern, pulls generated samples toward the pattern's VAE
/// reconstruction, writes a kohya file with metadata, and leaves the base weights bit-identical.
/// </summary>
[Collection(LoraSharp.Tests.Training.LlmTraining.TorchGlobalStateCollection.Name)]
public class LearningTests
{
    internal static string TinyModel => ReferenceData.PathOf("sd", "model", "diffusers");
    internal static string Tokenizer => ReferenceData.PathOf("sd", "tokenizer");

    /// <summary>Red/blue vertical stripes with a period of 16 px plus a little per-image noise.</summary>
    internal static void WritePattern(string path, int size, int seed)
    {
        var rng = new Random(seed);
        using var bmp = new SKBitmap(new SKImageInfo(size, size, SKColorType.Rgba8888, SKAlphaType.Opaque));
        for (int y = 0; y < size; y++)
            for (int x = 0; x < size; x++)
            {
                bool red = (x / 8) % 2 == 0;
                int j = rng.Next(-12, 13);
                bmp.SetPixel(x, y, red ? new SKColor((byte)(230 + Math.Min(j, 25)), (byte)(30 + j), (byte)(30 + j)) : new SKColor((byte)(20 + j), (byte)(40 + j), (byte)(220 + j)));
            }
        using var data = bmp.Encode(SKEncodedImageFormat.Png, 100);
        File.WriteAllBytes(path, data.ToArray());
    }

    /// <summary>SHA-256 over every base parameter (names and bytes; adapter parameters, if registered, are skipped).</summary>
    internal static string BaseChecksum(nn.Module m)
    {
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        foreach (var (name, p) in m.named_parameters())
        {
            if (name.Contains("lora")) continue;
            sha.AppendData(System.Text.Encoding.UTF8.GetBytes(name));
            sha.AppendData(p.detach().contiguous().bytes);
        }
        return Convert.ToHexString(sha.GetHashAndReset());
    }

    /// <summary>Mean denoising loss on fixed (noise, t) pairs of a held-out image.</summary>
    static double HeldOutLoss(SdTrainer trainer, Tensor latents, Tensor context)
    {
        var unet = trainer.Model!.Unet;
        unet.eval();
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        var noise = new DiffusionNoise();
        double total = 0;
        using var g = new Generator(1234);
        var ts = new long[] { 50, 150, 250, 350, 450, 550, 650, 750, 850, 950 };
        foreach (var t in ts)
        {
            var eps = randn(latents.shape, generator: g);
            var tt = tensor(new[] { t });
            var noisy = noise.AddNoise(latents, eps, tt);
            var pred = unet.Predict(noisy, tt, context);
            total += (pred - eps).pow(2).mean().item<float>();
        }
        return total / ts.Length;
    }

    [Fact]
    public void Locon_learns_a_stripe_pattern_and_leaves_the_base_untouched()
    {
        // The model is tiny: one thread avoids OpenMP spin-waits on a loaded CI machine (10× faster here).
        int threads = get_num_threads();
        set_num_threads(1);
        try { Run(); }
        finally { set_num_threads(threads); }
    }

    static void Run()
    {
        using var tmp = new TempDir();
        var concept = Directory.CreateDirectory(Path.Combine(tmp.Path, "data", "5_pattern")).FullName;
        for (int i = 0; i < 4; i++) WritePattern(Path.Combine(concept, $"img{i}.png"), 64, i);
        var heldOut = tmp.File("heldout.png");
        WritePattern(heldOut, 64, 99);
        var prompts = tmp.File("prompts.txt");
        File.WriteAllText(prompts, "pattern --w 64 --h 64 --s 12 --l 3 --d 7\n");
        var config = SdTrainConfig.FromTomlText($"""
            pretrained_model_name_or_path = "{TinyModel}"
            tokenizer_path = "{Tokenizer}"
            train_data_dir = "{Path.Combine(tmp.Path, "data")}"
            output_dir = "{Path.Combine(tmp.Path, "out")}"
            output_name = "stripes"
            resolution = "64"
            network_module = "networks.lora"
            network_dim = 8
            network_alpha = 8
            network_args = ["conv_dim=8", "conv_alpha=8"]
            learning_rate = 3e-3
            optimizer_type = "AdamW"
            lr_scheduler = "constant"
            max_train_epochs = 20
            train_batch_size = 4
            seed = 42
            cache_latents = true
            save_every_n_epochs = 6
            sample_every_n_epochs = 20
            sample_prompts = "{prompts}"
            sample_sampler = "ddim"
            training_comment = "learning test"
            """.Replace("\\", "/"));

        using var trainer = new SdTrainer(config);
        // base model copy for the "before" numbers: same files, no adapter
        using var baseModel = LoraSharp.Models.StableDiffusion.StableDiffusionModel.Load(TinyModel);
        string before = BaseChecksum(baseModel);
        var result = trainer.Train();
        var model = trainer.Model!;
        Assert.Equal(before, BaseChecksum(model));

        // held-out latents and the caption's conditioning, with and without the adapter
        var placement = new BucketManager((64, 64), false).Place(64, 64);
        var held = new PlacedImage(new TrainImage(heldOut, "pattern", new ConceptFolder(concept, "5_pattern", 5, "pattern", false)), placement, 64, 64);
        using var latents = LatentCache.Encode(model.Vae!, [held]);
        var tok = LoraSharp.Text.ClipTokenizer.FromFolder(Tokenizer);
        var adapter = trainer.Host!["lora"];
        double Loss(bool enabled)
        {
            adapter.Enabled = enabled;
            model.TextEncoder!.eval();
            using var noGrad = no_grad();
            using var ctx = model.TextEncoder.Encode(tensor(tok.Encode("pattern").Select(i => (long)i).ToArray()).reshape(1, -1));
            return HeldOutLoss(trainer, latents, ctx);
        }
        double baseLoss = Loss(false), trainedLoss = Loss(true);
        Assert.True(trainedLoss <= 0.7 * baseLoss, $"held-out loss {baseLoss:0.0000} → {trainedLoss:0.0000} (needs ≥ 30% lower)");

        // generated samples move toward the pattern: statistic = mean squared distance between the sampled latents and
        // the held-out pattern's latents (the random-weight VAE decoder hides most of the latent change in pixels, so
        // the decoded distance is only reported)
        using var recon = model.Vae!.Decode(latents / model.Vae.Config.ScalingFactor);
        var prompt = SamplePromptFile.Parse(["pattern --w 64 --h 64 --s 12 --l 3"])[0];
        (double Latent, double Pixel) Distance(bool enabled)
        {
            adapter.Enabled = enabled;
            double lat = 0, pix = 0;
            for (int seed = 0; seed < 3; seed++)
            {
                using var z = trainer.GenerateSampleLatents(prompt, seed);
                lat += (z - latents).pow(2).mean().item<float>() / 3;
                using var img = trainer.GenerateSample(prompt, seed);
                pix += (img - recon[0]).pow(2).mean().item<float>() / 3;
            }
            return (lat, pix);
        }
        var baseDist = Distance(false);
        var trainedDist = Distance(true);
        Assert.True(trainedDist.Latent <= 0.8 * baseDist.Latent,
            $"sample latent distance to the pattern {baseDist.Latent:0.0000} → {trainedDist.Latent:0.0000} (needs ≥ 20% closer); pixels {baseDist.Pixel:0.0000} → {trainedDist.Pixel:0.0000}");
        Console.WriteLine($"held-out loss {baseLoss:0.0000} → {trainedLoss:0.0000}; sample latent distance {baseDist.Latent:0.0000} → {trainedDist.Latent:0.0000}; pixels {baseDist.Pixel:0.0000} → {trainedDist.Pixel:0.0000}");

        // files: final + one epoch save, sample image, loss curve, kohya metadata
        Assert.Equal(4, result.SavedAdapters.Count); // epochs 6, 12, 18 and the final file
        Assert.True(File.Exists(Path.Combine(tmp.Path, "out", "stripes-000006.safetensors")));
        Assert.Single(result.SampleImages);
        Assert.True(File.Exists(result.LossCurvePath));
        using var file = SafetensorsFile.Open(result.AdapterPath);
        var md = file.Metadata;
        Assert.Equal("networks.lora", md["ss_network_module"]);
        Assert.Equal("8", md["ss_network_dim"]);
        Assert.Equal("20", md["ss_epoch"]);
        Assert.Equal("20", md["ss_num_train_images"]);
        Assert.Equal("learning test", md["ss_training_comment"]);
        Assert.Contains("\"5_pattern\"", md["ss_tag_frequency"]);
        Assert.Contains("conv_dim", md["ss_network_args"]);
        Assert.Equal(AdapterHashes.DataSectionSha256(result.AdapterPath), md["sshs_model_hash"]);
        Assert.Contains(file.Keys, k => k.StartsWith("lora_unet_down_blocks_0_attentions_0_", StringComparison.Ordinal));
        Assert.Contains(file.Keys, k => k.StartsWith("lora_unet_down_blocks_0_resnets_0_conv1.", StringComparison.Ordinal));
        Assert.Contains(file.Keys, k => k.StartsWith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.", StringComparison.Ordinal));
        // the saved file reads back as an adapter for this model
        using var read = AdapterFile.Read(result.AdapterPath, ModuleIndex.FromModule(model));
        Assert.Equal(trainer.Host["lora"].Modules.Count, read.Weights.Modules.Count);
    }
}
