using LoraSharp.Cli.Commands;
using LoraSharp.Imaging;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Training.Diffusion;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Training.Diffusion;

/// <summary>Trainer runs on the tiny reference models (one thread: tiny ops, loaded CI machines).</summary>
[Collection(LoraSharp.Tests.Training.LlmTraining.TorchGlobalStateCollection.Name)]
public class TrainerTests
{
    internal static T OneThread<T>(Func<T> f)
    {
        int threads = get_num_threads();
        set_num_threads(1);
        try { return f(); }
        finally { set_num_threads(threads); }
    }

    static string Dataset(TempDir tmp, int images = 2)
    {
        var concept = Directory.CreateDirectory(Path.Combine(tmp.Path, "data", "2_pattern")).FullName;
        for (int i = 0; i < images; i++) LearningTests.WritePattern(Path.Combine(concept, $"img{i}.png"), 64, i);
        File.WriteAllText(Path.Combine(concept, "img0.txt"), "pattern, red, blue");
        return Path.GetDirectoryName(concept)!;
    }

    internal static SdTrainConfig Config(TempDir tmp, string model, string output, params string[] extra)
    {
        var c = SdTrainConfig.FromTomlText($"""
            pretrained_model_name_or_path = "{model}"
            tokenizer_path = "{LearningTests.Tokenizer}"
            train_data_dir = "{Dataset(tmp)}"
            output_dir = "{Path.Combine(tmp.Path, output)}"
            output_name = "t"
            resolution = "64"
            caption_extension = ".txt"
            network_dim = 4
            network_alpha = 2
            learning_rate = 1e-3
            train_batch_size = 2
            seed = 3
            """.Replace("\\", "/"));
        c.ApplyArgs(extra);
        return c;
    }

    static Dictionary<string, float[]> ReadAll(string path)
    {
        using var f = SafetensorsFile.Open(path);
        return f.Keys.ToDictionary(k => k, k => { using var t = f.Load(k, ScalarType.Float32); return t.data<float>().ToArray(); });
    }

    [Fact]
    public void Sdxl_adapter_uses_kohya_sgm_names_for_the_same_modules_as_kohya()
    {
        using var tmp = new TempDir();
        var model = ReferenceData.PathOf("sdxl", "model", "diffusers");
        var result = OneThread(() =>
        {
            using var trainer = new SdTrainer(Config(tmp, model, "out", "--max_train_steps", "2", "--optimizer_type", "Lion", "--min_snr_gamma", "5", "--noise_offset", "0.05"));
            return trainer.Train();
        });
        Assert.Equal(2, result.Steps);
        Assert.All(result.Losses, l => Assert.True(double.IsFinite(l)));
        using var mine = SafetensorsFile.Open(result.AdapterPath);
        using var kohya = SafetensorsFile.Open(ReferenceData.PathOf("sdxl", "lora", "kohya_lora.safetensors"));
        static SortedSet<string> Modules(ITensorSource s) => new(s.Keys.Select(k => k[..k.IndexOf('.')]), StringComparer.Ordinal);
        Assert.Equal(Modules(kohya), Modules(mine));
        Assert.Equal("sdxl_base_v1-0", mine.Metadata["ss_base_model_version"]);
        Assert.Equal("stable-diffusion-xl-v1-base/lora", mine.Metadata["modelspec.architecture"]);
        Assert.Equal("lion_pytorch.lion_pytorch.Lion", mine.Metadata["ss_optimizer"]);
        Assert.Equal("5", mine.Metadata["ss_min_snr_gamma"]);
    }

    [Fact]
    public void V_prediction_schedule_from_the_model_folder_trains_with_the_velocity_target()
    {
        using var tmp = new TempDir();
        // the tiny SD model with a v_prediction scheduler config (as SD 2.x 768-v folders have)
        var model = Path.Combine(tmp.Path, "model");
        foreach (var dir in Directory.GetDirectories(LearningTests.TinyModel))
        {
            var target = Directory.CreateDirectory(Path.Combine(model, Path.GetFileName(dir))).FullName;
            foreach (var file in Directory.GetFiles(dir)) File.Copy(file, Path.Combine(target, Path.GetFileName(file)));
        }
        var sched = Path.Combine(model, "scheduler", "scheduler_config.json");
        var json = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(sched))!.AsObject();
        json["prediction_type"] = "v_prediction";
        File.WriteAllText(sched, json.ToJsonString());
        var result = OneThread(() =>
        {
            using var t = new SdTrainer(Config(tmp, model, "out", "--max_train_steps", "3", "--min_snr_gamma", "5", "--multires_noise_iterations", "4",
                "--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False", "--network_train_unet_only"));
            return t.Train();
        });
        Assert.All(result.Losses, l => Assert.True(double.IsFinite(l) && l > 0));
        using var f = SafetensorsFile.Open(result.AdapterPath);
        Assert.Equal("True", f.Metadata["ss_v_parameterization"]);
        Assert.Equal("v", f.Metadata["modelspec.prediction_type"]);
        Assert.Equal("transformers.optimization.Adafactor(relative_step=False,scale_parameter=False)", f.Metadata["ss_optimizer"]);
        Assert.DoesNotContain(f.Keys, k => k.StartsWith("lora_te", StringComparison.Ordinal));
    }

    [Fact]
    public void Resuming_from_a_saved_state_continues_exactly()
    {
        using var tmp = new TempDir();
        var model = LearningTests.TinyModel;
        var full = OneThread(() =>
        {
            using var t = new SdTrainer(Config(tmp, model, "full", "--max_train_epochs", "4", "--rank_dropout", "0.2"));
            return t.Train();
        });
        var half = OneThread(() =>
        {
            using var t = new SdTrainer(Config(tmp, model, "half", "--max_train_epochs", "2", "--rank_dropout", "0.2", "--save_state"));
            return t.Train();
        });
        var state = Path.Combine(tmp.Path, "half", "t-state");
        Assert.True(File.Exists(Path.Combine(state, "optimizer.safetensors")));
        var resumed = OneThread(() =>
        {
            using var t = new SdTrainer(Config(tmp, model, "resumed", "--max_train_epochs", "4", "--rank_dropout", "0.2", "--resume", state));
            return t.Train();
        });
        Assert.Equal(full.Steps, resumed.Steps);
        Assert.Equal(full.Losses.Skip(half.Losses.Count), resumed.Losses);
        var a = ReadAll(full.AdapterPath);
        var b = ReadAll(resumed.AdapterPath);
        Assert.Equal(a.Keys.Order(), b.Keys.Order());
        foreach (var (k, v) in a) Assert.Equal(v, b[k]);
        var bad = Assert.Throws<LoraSharpException>(() => OneThread(() =>
        {
            using var t = new SdTrainer(Config(tmp, model, "bad", "--max_train_epochs", "4", "--network_dim", "8", "--resume", state));
            return t.Train();
        }));
        Assert.Contains("shape", bad.Message);
    }

    [Fact]
    public void Sample_prompts_are_rendered_by_the_txt2img_pipeline_with_the_trained_adapter_into_the_sample_folder()
    {
        using var tmp = new TempDir();
        var prompts = tmp.File("prompts.txt");
        File.WriteAllText(prompts, """
            # kohya prompt file
            pattern, red, blue --n blurry --w 64 --h 64 --s 6 --l 4 --d 11
            pattern --w 128 --h 64 --s 5 --l 3.5 --d 12 --ss euler_a
            """);
        var lrs = new List<double>();
        OneThread(() =>
        {
            // 2 images × 2 repeats, batch 2: 2 steps per epoch, 4 in all; linear with a warm-up ratio of 0.5 (= 2 steps)
            using var trainer = new SdTrainer(Config(tmp, LearningTests.TinyModel, "out", "--max_train_epochs", "2", "--learning_rate", "2e-2",
                "--lr_scheduler", "linear", "--lr_warmup_steps", "0.5", "--sample_every_n_epochs", "1", "--sample_prompts", prompts, "--sample_sampler", "ddim"));
            trainer.Progress += p => lrs.Add(p.LearningRate);
            var result = trainer.Train();

            Assert.Equal([0, 1e-2, 2e-2, 1e-2], lrs.Select(v => Math.Round(v, 12)));
            var sampleDir = Path.Combine(tmp.Path, "out", "sample");
            Assert.Equal(4, result.SampleImages.Count);
            Assert.All(result.SampleImages, f => Assert.Equal(sampleDir, Path.GetDirectoryName(f)));
            Assert.Equal(result.SampleImages.Order(), Directory.GetFiles(sampleDir, "*.png").Order());
            Assert.Matches(@"^t_e000001_00_\d{14}_11\.png$", Path.GetFileName(result.SampleImages[0]));
            Assert.Matches(@"^t_e000002_01_\d{14}_12\.png$", Path.GetFileName(result.SampleImages[3]));

            var last = result.SampleImages[2]; // epoch 2, prompt 0
            var infotext = GenerationParameters.ReadFromPng(last)!;
            Assert.Equal("pattern, red, blue", infotext.Prompt);
            Assert.Equal("blurry", infotext.NegativePrompt);
            Assert.Equal("6", infotext.Get("Steps"));
            Assert.Equal("DDIM", infotext.Get("Sampler"));
            Assert.Equal("4", infotext.Get("CFG scale"));
            Assert.Equal("11", infotext.Get("Seed"));
            Assert.Equal("64x64", infotext.Get("Size"));
            Assert.Equal("Euler a", GenerationParameters.ReadFromPng(result.SampleImages[3])!.Get("Sampler"));
            using (var second = PngImage.Load(result.SampleImages[3])) Assert.Equal((128, 64), (second.Width, second.Height));

            // the same request through the trainer's pipeline: identical pixels with the adapter, different without it
            var prompt = SamplePromptFile.Read(prompts)[0];
            static byte[] Rgb(SkiaSharp.SKBitmap bmp) => bmp.Pixels.SelectMany(c => new[] { c.Red, c.Green, c.Blue }).ToArray();
            byte[] Pixels(bool adapterOn)
            {
                trainer.Host!["lora"].Enabled = adapterOn;
                using var img = trainer.GenerateSample(prompt, 11);
                using var bmp = PngImage.ToBitmap(img);
                return Rgb(bmp);
            }
            byte[] saved;
            using (var bmp = PngImage.Load(last)) saved = Rgb(bmp);
            var with = Pixels(true);
            var without = Pixels(false);
            Assert.Equal(saved, with);
            int changed = with.Zip(without).Count(p => p.First != p.Second);
            Assert.True(changed > with.Length / 20, $"only {changed} of {with.Length} bytes differ without the adapter");
            return 0;
        });
    }

    [Fact]
    public void Train_command_runs_from_a_toml_file_with_flag_overrides()
    {
        using var tmp = new TempDir();
        var data = Dataset(tmp);
        var toml = tmp.File("train.toml");
        File.WriteAllText(toml, $"""
            [model]
            pretrained_model_name_or_path = "{LearningTests.TinyModel}"
            tokenizer_path = "{LearningTests.Tokenizer}"
            [data]
            train_data_dir = "{data}"
            resolution = "64"
            enable_bucket = true
            min_bucket_reso = 64
            max_bucket_reso = 128
            [train]
            output_dir = "{Path.Combine(tmp.Path, "out")}"
            output_name = "cli"
            network_module = "lycoris.kohya"
            network_args = ["algo=lokr", "factor=4"]
            network_dim = 4
            optimizer_type = "Prodigy"
            learning_rate = 1.0
            max_train_steps = 3
            save_model_as = "safetensors"
            """.Replace("\\", "/"));
        int code = OneThread(() => TrainCommand.Run(toml, ["--max_train_steps", "2", "--gradient_checkpointing", "--mixed_precision", "bf16", "--output_name", "cli2"]));
        Assert.Equal(0, code);
        var file = Path.Combine(tmp.Path, "out", "cli2.safetensors");
        Assert.True(File.Exists(file));
        Assert.True(File.Exists(Path.Combine(tmp.Path, "out", "cli2_loss.png")));
        using var f = SafetensorsFile.Open(file);
        Assert.Contains(f.Keys, k => k.Contains(".lokr_w", StringComparison.Ordinal));
        Assert.Equal("lycoris.kohya", f.Metadata["ss_network_module"]);
        Assert.Equal("2", f.Metadata["ss_steps"]);
        Assert.Equal("True", f.Metadata["ss_gradient_checkpointing"]);
        Assert.Equal("bf16", f.Metadata["ss_mixed_precision"]);
        var e = Assert.Throws<LoraSharpException>(() => TrainCommand.Run(toml, ["--netwrk_dim", "8"]));
        Assert.Contains("network_dim", e.Message);
    }
}
