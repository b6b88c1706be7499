using LoraSharp.Adapters;
using LoraSharp.Diffusion;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Training.Diffusion;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Training.Diffusion;

/// <summary>kohya's zero_terminal_snr, loss_type (l1 / huber / smooth_l1 with huber_schedule), ip_noise_gamma, save_every_n_steps and LoRA+.</summary>
[Collection(LoraSharp.Tests.Training.LlmTraining.TorchGlobalStateCollection.Name)]
public class TrainerOptionsTests
{
    [Fact]
    public void Zero_terminal_snr_matches_the_betas_route_and_ends_at_zero()
    {
        var original = ScheduleConfig.StableDiffusion.AlphasCumprod();
        var noise = new DiffusionNoise(ScheduleConfig.StableDiffusion, zeroTerminalSnr: true);
        var ac = noise.AlphasCumprod;
        Assert.Equal(0f, ac[^1]);
        Assert.Equal(original[0], ac[0], 6);
        for (int t = 1; t < ac.Count; t++) Assert.True(ac[t] < ac[t - 1]);
        // kohya's route (Lin et al., Algorithm 1): betas → rescaled √ᾱ → alphas → betas → cumprod
        var root = original.Select(a => Math.Sqrt(a)).ToArray();
        double r0 = root[0], rT = root[^1];
        var bar = root.Select(r => Math.Pow((r - rT) * r0 / (r0 - rT), 2)).ToArray();
        double cum = 1;
        for (int t = 0; t < bar.Length; t++)
        {
            double alpha = t == 0 ? bar[0] : bar[t] / bar[t - 1];
            cum *= alpha;
            Assert.True(Math.Abs(cum - ac[t]) < 1e-6, $"t={t}: {ac[t]} vs {cum}");
        }
        // min-SNR weights at SNR 0 take their limits instead of 0/0
        using var last = tensor(new long[] { 999 });
        Assert.Equal(1f, noise.MinSnrWeights(last, 5, vPrediction: false).item<float>());
        Assert.Equal(0f, noise.MinSnrWeights(last, 5, vPrediction: true).item<float>());
    }

    [Fact]
    public void Losses_and_huber_thresholds_follow_kohyas_formulas()
    {
        using var scope = NewDisposeScope();
        var pred = tensor(new float[] { 0.5f, -2f, 0f, 1f }).reshape(2, 2, 1, 1);
        var target = zeros(2, 2, 1, 1);
        var c = tensor(new float[] { 0.1f, 1f });
        float[] Values(Tensor t) => t.flatten().data<float>().ToArray();
        Assert.Equal(new[] { 0.25f, 4f, 0f, 1f }, Values(DiffusionNoise.Loss(pred, target, "l2")));
        Assert.Equal(new[] { 0.5f, 2f, 0f, 1f }, Values(DiffusionNoise.Loss(pred, target, "l1")));
        double H(double d, double k) => 2 * k * (Math.Sqrt(d * d + k * k) - k);
        double S(double d, double k) => 2 * (Math.Sqrt(d * d + k * k) - k);
        var huber = Values(DiffusionNoise.Loss(pred, target, "huber", c));
        var smooth = Values(DiffusionNoise.Loss(pred, target, "smooth_l1", c));
        double[] d = [0.5, -2, 0, 1], k = [0.1, 0.1, 1, 1];
        for (int i = 0; i < 4; i++)
        {
            Assert.Equal(H(d[i], k[i]), huber[i], 5);
            Assert.Equal(S(d[i], k[i]), smooth[i], 5);
        }
        Assert.Throws<ArgumentException>(() => DiffusionNoise.Loss(pred, target, "huber"));

        var noise = new DiffusionNoise();
        var ts = tensor(new long[] { 0, 500, 999 });
        var snr = Values(noise.HuberThreshold(ts, "snr", 0.1, 1));
        for (int i = 0; i < 3; i++)
        {
            double a = noise.AlphasCumprod[new[] { 0, 500, 999 }[i]];
            Assert.Equal(0.9 / Math.Pow(1 + Math.Sqrt((1 - a) / a), 2) + 0.1, snr[i], 5);
        }
        Assert.True(snr[0] > 0.9 && snr[2] < 0.11, "snr schedule: large at t=0, → c at the end");
        var exp = Values(noise.HuberThreshold(ts, "exponential", 0.1, 2));
        Assert.Equal(2f, exp[0], 5);
        Assert.Equal(2 * Math.Pow(0.1, 999 / 1000.0), exp[2], 5);
        Assert.Equal(new[] { 0.2f, 0.2f, 0.2f }, Values(noise.HuberThreshold(ts, "constant", 0.1, 2)));
    }

    [Fact]
    public void Kohya_options_train_save_every_n_steps_and_lora_plus_speeds_up_the_up_matrices()
    {
        using var tmp = new TempDir();
        string[] options =
        [
            "--max_train_steps", "7", "--save_every_n_steps", "2", "--save_last_n_steps", "2", "--ip_noise_gamma", "0.1", "--zero_terminal_snr",
            "--loss_type", "huber", "--huber_schedule", "snr", "--min_snr_gamma", "5", "--network_args", "loraplus_lr_ratio=4", "--network_train_unet_only",
        ];
        var (result, groups) = TrainerTests.OneThread(() =>
        {
            using var t = new SdTrainer(TrainerTests.Config(tmp, LearningTests.TinyModel, "out", options));
            var r = t.Train();
            return (r, t.Optimizer!.Groups.Select(g => (g.Name, g.BaseLearningRate, g.Parameters.Count)).ToList());
        });
        Assert.Equal(7, result.Steps);
        Assert.All(result.Losses, l => Assert.True(double.IsFinite(l) && l > 0));
        // saves at steps 2, 4, 6; save_last_n_steps 2 removed step 2 when step 6 was saved
        var outDir = Path.Combine(tmp.Path, "out");
        Assert.False(File.Exists(Path.Combine(outDir, "t-step00000002.safetensors")));
        Assert.True(File.Exists(Path.Combine(outDir, "t-step00000004.safetensors")));
        Assert.True(File.Exists(Path.Combine(outDir, "t-step00000006.safetensors")));
        Assert.True(File.Exists(Path.Combine(outDir, "t.safetensors")));
        using (var f = SafetensorsFile.Open(Path.Combine(outDir, "t-step00000004.safetensors")))
            Assert.Equal("4", f.Metadata["ss_steps"]);
        using (var f = SafetensorsFile.Open(result.AdapterPath))
        {
            Assert.Equal("huber", f.Metadata["ss_loss_type"]);
            Assert.Equal("snr", f.Metadata["ss_huber_schedule"]);
            Assert.Equal("0.1", f.Metadata["ss_huber_c"]);
            Assert.Equal("True", f.Metadata["ss_zero_terminal_snr"]);
            Assert.Equal("0.1", f.Metadata["ss_ip_noise_gamma"]);
            Assert.Contains("\"loraplus_lr_ratio\":\"4\"", f.Metadata["ss_network_args"]);
        }
        // LoRA+: the up matrices have their own group at 4 × the learning rate
        Assert.Equal(2, groups.Count);
        var (name, lr, count) = groups.Single(g => g.Name == "unet_lora_up");
        Assert.Equal(4 * groups.Single(g => g.Name == "unet").BaseLearningRate, lr, 12);
        Assert.True(count > 0);

        // one step from zero-initialised up matrices: AdamW moves each by lr (× ratio with LoRA+)
        double MaxUp(params string[] extra)
        {
            using var t2 = new TempDir();
            return TrainerTests.OneThread(() =>
            {
                using var t = new SdTrainer(TrainerTests.Config(t2, LearningTests.TinyModel, "out", ["--max_train_steps", "1", "--network_train_unet_only", "--max_grad_norm", "0", .. extra]));
                t.Train();
                return t.Host!.NamedTrainableParameters().Where(p => p.Name.EndsWith("/lora_up", StringComparison.Ordinal)).Max(p => p.Param.abs().max().item<float>());
            });
        }
        double plain = MaxUp(), plus = MaxUp("--network_args", "loraplus_lr_ratio=4");
        Assert.Equal(4, plus / plain, 2);
    }

    [Fact]
    public void Snr_loss_terms_noise_offsets_and_caption_dropouts_follow_kohya()
    {
        using var scope = NewDisposeScope();
        var noise = new DiffusionNoise();
        var ts = tensor(new long[] { 0, 300, 900 });
        var loss = tensor(new float[] { 1f, 2f, 3f });
        double[] snr = ts.data<long>().ToArray().Select(t => Math.Min(noise.Snr((int)t), 1000)).ToArray();
        float[] Run(bool scaleV, double? vlike, bool debiased) => noise.SnrLossTerms(loss, ts, scaleV, vlike, debiased).data<float>().ToArray();
        for (int i = 0; i < 3; i++)
        {
            double l = i + 1, sc = snr[i] / (snr[i] + 1);
            Assert.Equal(l * sc, Run(true, null, false)[i], 4);
            Assert.Equal(l + l / sc * 0.5, Run(false, 0.5, false)[i], 4);
            Assert.Equal(l / Math.Sqrt(snr[i]), Run(false, null, true)[i], 4);
            double all = l * sc;
            all += all / sc * 0.5;
            Assert.Equal(all / Math.Sqrt(snr[i]), Run(true, 0.5, true)[i], 4);
        }
        Assert.Same(loss, noise.SnrLossTerms(loss, ts, false, null, false));

        // adaptive noise offset: per (sample, channel) max(0, c + s·|latent mean|) · N(0, 1)
        var latents = tensor(new float[] { 2f, -4f }).reshape(1, 2, 1, 1).expand(1, 2, 4, 4).contiguous();
        var eps = zeros(1, 2, 4, 4);
        var shifted = DiffusionNoise.ApplyAdaptiveNoiseOffset(eps, latents, 0.1, 0.5, new TorchSharp.torch.Generator(7));
        var z = randn([1, 2, 1, 1], generator: new TorchSharp.torch.Generator(7));
        var expected = (tensor(new float[] { 0.1f + 0.5f * 2, 0.1f + 0.5f * 4 }).reshape(1, 2, 1, 1) * z).expand(1, 2, 4, 4);
        Assert.True((shifted - expected).abs().max().item<float>() < 1e-6);

        // caption tag dropout keeps the first keep_tokens tags; caption_dropout_every_n_epochs empties epochs N, 2N, …
        var all1 = new CaptionProcessor(false, 1, 0, tagDropoutRate: 1.0);
        Assert.Equal("sks", all1.Process("sks, red, round, big", new Random(1)));
        var half = new CaptionProcessor(false, 0, 0, tagDropoutRate: 0.5);
        var rng = new Random(2);
        double kept = Enumerable.Range(0, 400).Average(_ => half.Process("a, b, c, d", rng).Split(", ", StringSplitOptions.RemoveEmptyEntries).Length) / 4;
        Assert.InRange(kept, 0.42, 0.58);
        var every = new CaptionProcessor(false, 0, 0, dropoutEveryNEpochs: 2);
        Assert.Equal("sks, red", every.Process("sks, red", new Random(3), epoch: 1));
        Assert.Equal("", every.Process("sks, red", new Random(3), epoch: 2));
        Assert.Equal("sks, red", every.Process("sks, red", new Random(3), epoch: 3));
    }

    [Fact]
    public void Noise_offset_strengths_snr_losses_and_caption_dropouts_train_and_are_recorded()
    {
        using var tmp = new TempDir();
        var result = TrainerTests.OneThread(() =>
        {
            using var t = new SdTrainer(TrainerTests.Config(tmp, LearningTests.TinyModel, "out", "--max_train_steps", "3", "--noise_offset", "0.05",
                "--noise_offset_random_strength", "--adaptive_noise_scale", "0.1", "--debiased_estimation_loss", "--v_pred_like_loss", "0.2",
                "--caption_tag_dropout_rate", "0.3", "--caption_dropout_every_n_epochs", "2", "--loss_type", "smooth_l1", "--huber_schedule", "exponential"));
            return t.Train();
        });
        Assert.All(result.Losses, l => Assert.True(double.IsFinite(l) && l > 0));
        using var f = SafetensorsFile.Open(result.AdapterPath);
        Assert.Equal("True", f.Metadata["ss_noise_offset_random_strength"]);
        Assert.Equal("0.1", f.Metadata["ss_adaptive_noise_scale"]);
        Assert.Equal("True", f.Metadata["ss_debiased_estimation"]);
        Assert.Equal("0.3", f.Metadata["ss_caption_tag_dropout_rate"]);
        Assert.Equal("2", f.Metadata["ss_caption_dropout_every_n_epochs"]);
        Assert.Equal("smooth_l1", f.Metadata["ss_loss_type"]);
        Assert.Equal("1.0", f.Metadata["ss_huber_scale"]);

        var bad = Assert.Throws<LoraSharpException>(() => TrainerTests.Config(tmp, LearningTests.TinyModel, "out2", "--zero_terminal_snr", "--debiased_estimation_loss").Validate());
        Assert.Equal("debiased_estimation_loss", bad.Key);
    }

    /// <summary>A kohya dataset config: two subsets (one regularisation), [general] defaults, dataset values overriding the run's.</summary>
    static string DatasetToml(TempDir tmp, string extraSubsetLine = "", string extraTables = "")
    {
        var imgs = Directory.CreateDirectory(Path.Combine(tmp.Path, "imgs")).FullName;
        var reg = Directory.CreateDirectory(Path.Combine(tmp.Path, "reg")).FullName;
        for (int i = 0; i < 3; i++)
        {
            LearningTests.WritePattern(Path.Combine(imgs, $"a{i}.png"), 64, i);
            File.WriteAllText(Path.Combine(imgs, $"a{i}.txt"), $"sks, pattern, tag{i}");
        }
        LearningTests.WritePattern(Path.Combine(reg, "r0.png"), 64, 7);
        var path = Path.Combine(tmp.Path, "dataset.toml");
        File.WriteAllText(path, $"""
            [general]
            shuffle_caption = true
            keep_tokens = 1
            caption_extension = ".txt"

            [[datasets]]
            resolution = 64
            batch_size = 2
            enable_bucket = false

              [[datasets.subsets]]
              image_dir = "imgs"
              num_repeats = 4
              class_tokens = "sks"
              caption_tag_dropout_rate = 0.1
              flip_aug = false
              {extraSubsetLine}

              [[datasets.subsets]]
              image_dir = "{reg.Replace('\\', '/')}"
              is_reg = true
              class_tokens = "pattern"
              shuffle_caption = false
            {extraTables}
            """);
        return path;
    }

    static SdTrainConfig DatasetRun(TempDir tmp, string datasetToml, params string[] extra)
    {
        var c = SdTrainConfig.FromTomlText($"""
            pretrained_model_name_or_path = "{LearningTests.TinyModel}"
            tokenizer_path = "{LearningTests.Tokenizer}"
            dataset_config = "{datasetToml}"
            output_dir = "{Path.Combine(tmp.Path, "out")}"
            output_name = "d"
            resolution = "128"
            train_batch_size = 1
            network_dim = 4
            seed = 3
            """.Replace("\\", "/"));
        c.ApplyArgs(extra);
        return c;
    }

    [Fact]
    public void Kohya_dataset_config_subsets_with_their_own_caption_options_train()
    {
        using var tmp = new TempDir();
        var toml = DatasetToml(tmp).Replace("\\", "/");
        var c = DatasetRun(tmp, toml, "--max_train_steps", "2");
        var data = TrainingDataset.Load(c);
        Assert.Equal((64, 64), c.Resolution);
        Assert.Equal(2, c.TrainBatchSize);
        Assert.Equal(3, data.Train.Count);
        Assert.Equal(12, data.TrainImagesWithRepeats);
        Assert.Single(data.Regularization);
        var subset = data.Train[0].Image.Folder;
        Assert.Equal(new CaptionSettings(Shuffle: true, KeepTokens: 1, TagDropoutRate: 0.1), subset.Captions);
        Assert.Equal("4_sks", subset.Name);
        Assert.Equal("sks, pattern, tag0", data.Train[0].Image.Caption);
        Assert.Equal("pattern", data.Regularization[0].Image.Caption);
        Assert.False(data.Regularization[0].Image.Folder.Captions!.Shuffle);
        // per-subset options in use: keep_tokens 1 keeps "sks" first whatever the shuffle
        var captions = new CaptionProcessor(false, 0, 0);
        var rng = new Random(4);
        Assert.All(Enumerable.Range(0, 20), _ => Assert.StartsWith("sks", captions.Process(data.Train[0].Image, rng)));

        var result = TrainerTests.OneThread(() =>
        {
            using var t = new SdTrainer(DatasetRun(tmp, toml, "--max_train_steps", "2"));
            return t.Train();
        });
        Assert.Equal(2, result.Steps);
        using var f = SafetensorsFile.Open(result.AdapterPath);
        Assert.Equal("12", f.Metadata["ss_num_train_images"]);
        Assert.Equal("(64, 64)", f.Metadata["ss_resolution"]);
    }

    [Fact]
    public void Dataset_config_errors_name_the_file_and_the_key()
    {
        using var tmp = new TempDir();
        LoraSharpException Fails(string toml, params string[] extra) =>
            Assert.Throws<LoraSharpException>(() => TrainingDataset.Load(DatasetRun(tmp, toml.Replace("\\", "/"), extra)));
        var unknown = Fails(DatasetToml(tmp, "colour_jitter = 2"));
        Assert.Equal("datasets.subsets.colour_jitter", unknown.Key);
        Assert.EndsWith("dataset.toml", unknown.FilePath);
        var aug = Fails(DatasetToml(tmp, "color_aug = true"));
        Assert.Equal("datasets.subsets.color_aug", aug.Key);
        Assert.Contains("not supported", aug.Message);
        var missing = Fails(DatasetToml(tmp, "num_repeats = 0"));
        Assert.Equal("datasets.subsets.num_repeats", missing.Key);
        var both = Assert.Throws<LoraSharpException>(() => DatasetRun(tmp, DatasetToml(tmp).Replace("\\", "/"), "--train_data_dir", tmp.Path).Validate());
        Assert.Equal("dataset_config", both.Key);
    }

    [Fact]
    public void Scale_weight_norms_caps_each_lora_update_norm_by_scaling_up_and_down_equally()
    {
        using var model = TorchSharp.torch.nn.Sequential(("a", TorchSharp.torch.nn.Linear(16, 16)), ("b", TorchSharp.torch.nn.Linear(16, 16)));
        using var host = new AdapterHost(model);
        manual_seed(1);
        var lora = host.Create("l", new AdapterConfig { Rank = 4, Alpha = 2 }, ModuleSelector.Glob("*"));
        var big = (LoraAdapter)lora.Modules.Single(m => m.ModulePath == "a");
        var small = (LoraAdapter)lora.Modules.Single(m => m.ModulePath == "b");
        using (no_grad())
        {
            big.Up.copy_(randn(16, 4));
            small.Up.copy_(randn(16, 4) * 1e-4);
        }
        double Norm(Adapter a) { using var d = a.DeltaWeight(); return d.norm().item<float>(); }
        double before = Norm(big), smallBefore = Norm(small);
        Assert.True(before > 1 && smallBefore < 0.5);
        using var downBefore = big.Down.detach().clone();
        var report = MaxNormRegularization.Apply(lora.Modules, 0.5);
        Assert.Equal(1, report.ModulesScaled);
        Assert.Equal(0.5, Norm(big), 4);
        Assert.Equal(smallBefore, Norm(small), 6);
        Assert.Equal(0.5, report.MaxNorm, 4);
        // up and down are scaled by the same factor √(0.5/‖ΔW‖)
        using var ratio = big.Down.detach() / downBefore;
        Assert.Equal(Math.Sqrt(0.5 / before), ratio.mean().item<float>(), 4);

        using var tmp = new TempDir();
        var (result, last) = TrainerTests.OneThread(() =>
        {
            using var t = new SdTrainer(TrainerTests.Config(tmp, LearningTests.TinyModel, "out", "--max_train_steps", "3", "--learning_rate", "0.05", "--scale_weight_norms", "0.002"));
            var r = t.Train();
            return (r, t.LastMaxNorm);
        });
        Assert.NotNull(last);
        Assert.True(last!.ModulesScaled > 0);
        Assert.True(last.MaxNorm <= 0.002 + 1e-6);
        using var f = SafetensorsFile.Open(result.AdapterPath);
        Assert.Equal("0.002", f.Metadata["ss_scale_weight_norms"]);
    }

    [Fact]
    public void Sample_prompts_read_from_kohyas_json_and_toml_layouts()
    {
        var json = SamplePromptFile.ParseJson("""
            [
              "a cat --n blurry --w 300 --s 12 --d 5",
              { "prompt": "a dog", "negative_prompt": "ugly", "width": 640, "height": 513, "sample_steps": 2000, "scale": 5.5, "seed": 9, "sample_sampler": "k_euler" }
            ]
            """);
        Assert.Equal(new SamplePrompt("a cat", "blurry", 296, 512, 12, 7.5, 5, null, 1), json[0]);
        Assert.Equal(new SamplePrompt("a dog", "ugly", 640, 512, 1000, 5.5, 9, "k_euler", 2), json[1]);

        var toml = SamplePromptFile.ParseToml("""
            [prompt]
            width = 256
            height = 256
            scale = 4.0
            negative_prompt = "lowres"

              [[prompt.subset]]
              prompt = "a red star"

              [[prompt.subset]]
              prompt = "a blue star"
              width = 128
              seed = 3
            """);
        Assert.Equal(new SamplePrompt("a red star", "lowres", 256, 256, 30, 4.0, null, null, 1), toml[0]);
        Assert.Equal(new SamplePrompt("a blue star", "lowres", 128, 256, 30, 4.0, 3, null, 2), toml[1]);

        Assert.Equal("colour", Assert.Throws<LoraSharpException>(() => SamplePromptFile.ParseJson("""[{ "prompt": "x", "colour": 1 }]""")).Key);
        Assert.Equal("width", Assert.Throws<LoraSharpException>(() => SamplePromptFile.ParseJson("""[{ "prompt": "x", "width": "wide" }]""")).Key);
        Assert.Equal("prompt.subset", Assert.Throws<LoraSharpException>(() => SamplePromptFile.ParseToml("[prompt]\nwidth = 64\n")).Key);

        // Read dispatches on the extension
        using var tmp = new TempDir();
        File.WriteAllText(tmp.File("p.json"), """["a cat"]""");
        Assert.Equal("a cat", SamplePromptFile.Read(tmp.File("p.json")).Single().Prompt);
    }

    [Theory]
    [InlineData("unet.down_blocks.0.resnets.0.conv1", 1)]
    [InlineData("unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q", 2)]
    [InlineData("unet.down_blocks.0.downsamplers.0.conv", 3)]
    [InlineData("unet.down_blocks.2.attentions.0.proj_in", 7)]
    [InlineData("unet.down_blocks.3.resnets.1.conv2", 11)]
    [InlineData("unet.mid_block.attentions.0.proj_out", 12)]
    [InlineData("unet.mid_block.resnets.1.conv1", 12)]
    [InlineData("unet.up_blocks.0.resnets.0.conv1", 13)]
    [InlineData("unet.up_blocks.0.upsamplers.0.conv", 15)]
    [InlineData("unet.up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2", 18)]
    [InlineData("unet.up_blocks.3.attentions.2.proj_out", 24)]
    [InlineData("text_encoder.text_model.encoder.layers.0.mlp.fc1", -1)]
    public void Kohya_block_index_of_unet_modules(string path, int block) => Assert.Equal(block, NetworkSpec.KohyaBlockIndex(path));

    [Fact]
    public void Block_dims_give_each_unet_block_its_rank_and_alpha_and_zero_leaves_it_out()
    {
        using var tmp = new TempDir();
        // IN blocks rank 2 (IN02 left out), MID 6, OUT blocks 3 (alpha 1.5); conv blocks rank 1 everywhere but MID
        var dims = Enumerable.Range(0, 25).Select(b => b == 2 ? 0 : b < 12 ? 2 : b == 12 ? 6 : 3).ToArray();
        var alphas = Enumerable.Range(0, 25).Select(b => b > 12 ? 1.5 : 1.0).ToArray();
        var convDims = Enumerable.Range(0, 25).Select(b => b == 12 ? 0 : 1).ToArray();
        string Csv<T>(IEnumerable<T> v) => string.Join(",", v.Select(x => Convert.ToString(x, System.Globalization.CultureInfo.InvariantCulture)));
        var result = TrainerTests.OneThread(() =>
        {
            using var t = new SdTrainer(TrainerTests.Config(tmp, LearningTests.TinyModel, "out", "--max_train_steps", "1", "--network_args",
                "block_dims=" + Csv(dims), "block_alphas=" + Csv(alphas), "conv_block_dims=" + Csv(convDims)));
            var r = t.Train();
            var modules = t.Host!["lora"].Modules.Where(m => m.ModulePath.StartsWith("unet.", StringComparison.Ordinal)).ToList();
            Assert.NotEmpty(modules);
            foreach (var m in modules)
            {
                int block = NetworkSpec.KohyaBlockIndex(m.ModulePath);
                bool kxk = m.Geometry.IsConv && !m.Geometry.IsPointwise;
                if (!kxk) Assert.NotEqual(2, block); // IN02's linears are left out (its convs have conv rank 1)
                Assert.Equal(kxk ? convDims[block] : dims[block], m.Rank);
                if (kxk) Assert.NotEqual(12, block);
                else Assert.Equal(alphas[block], m.Alpha);
            }
            Assert.Contains(modules, m => m.Geometry.IsConv && !m.Geometry.IsPointwise);
            Assert.Contains(modules, m => NetworkSpec.KohyaBlockIndex(m.ModulePath) == 12 && m.Rank == 6);
            Assert.All(t.Host!["lora"].Modules.Where(m => m.ModulePath.StartsWith("text_encoder", StringComparison.Ordinal)), m => Assert.Equal(4, m.Rank));
            return r;
        });
        using var f = SafetensorsFile.Open(result.AdapterPath);
        Assert.Contains("block_dims", f.Metadata["ss_network_args"]);
        var bad = Assert.Throws<LoraSharpException>(() => TrainerTests.Config(tmp, LearningTests.TinyModel, "out2", "--network_args", "block_dims=1,2,3").Validate());
        Assert.Contains("25", bad.Message);
    }

    [Fact]
    public void Long_captions_are_cut_into_75_token_chunks_and_joined_as_kohya_does()
    {
        var tok = LoraSharp.Text.ClipTokenizer.FromFolder(LearningTests.Tokenizer);
        var tok2 = LoraSharp.Text.ClipTokenizer.FromFolder(LearningTests.Tokenizer, padId: 0); // SD 2.x / SDXL encoder 2 padding
        var caption = string.Join(", ", Enumerable.Range(0, 25).Select(i => $"tag{i}"));
        var tokens = tok.EncodeTokens(caption);
        Assert.InRange(tokens.Length, 76, 150);
        foreach (var t in new[] { tok, tok2 })
        {
            var chunks = LongCaptions.ChunkIds(t, caption, 150);
            Assert.Equal(2, chunks.Length);
            Assert.All(chunks, c => Assert.Equal(77, c.Length));
            Assert.All(chunks, c => Assert.Equal(t.BosId, c[0]));
            Assert.Equal(tokens[..75], chunks[0][1..76]);
            Assert.Equal(tokens[75..], chunks[1][1..(1 + tokens.Length - 75)]);
            Assert.Equal(t.EosId, chunks[1][1 + tokens.Length - 75]);
            // the first chunk's text runs to its end: it closes with EOS (pad = EOS, or the SD2 fix-up)
            Assert.Equal(t.EosId, chunks[0][76]);
            Assert.Equal(t.PadId, chunks[1][76]);
        }
        // an empty second chunk with a separate padding id reads BOS EOS PAD …
        var shortChunks = LongCaptions.ChunkIds(tok2, "tag1", 150);
        Assert.Equal(new[] { tok2.BosId, tok2.EosId, 0 }, shortChunks[1][..3]);

        // joining: BOS, 75 inner states of each chunk, the last state
        using var scope = NewDisposeScope();
        int b = 2, n = 3;
        var states = (arange(b * n, dtype: ScalarType.Float32).reshape(-1, 1, 1) * 1000 + arange(77, dtype: ScalarType.Float32).reshape(1, -1, 1)).contiguous();
        var merged = LongCaptions.Merge(states, b);
        Assert.Equal(new long[] { b, 2 + 75 * n, 1 }, merged.shape);
        var row1 = merged[1, .., 0].data<float>().ToArray();
        Assert.Equal(3000 + 0, row1[0]);                 // BOS of caption 1's first chunk
        Assert.Equal(3000 + 1, row1[1]);
        Assert.Equal(3000 + 75, row1[75]);
        Assert.Equal(4000 + 1, row1[76]);                // second chunk, first token
        Assert.Equal(5000 + 75, row1[225]);
        Assert.Equal(5000 + 76, row1[226]);              // the last chunk's final state

        using var tmp = new TempDir();
        var data = Path.Combine(tmp.Path, "data", "2_long");
        Directory.CreateDirectory(data);
        for (int i = 0; i < 2; i++)
        {
            LearningTests.WritePattern(Path.Combine(data, $"i{i}.png"), 64, i);
            File.WriteAllText(Path.Combine(data, $"i{i}.txt"), caption);
        }
        var result = TrainerTests.OneThread(() =>
        {
            var c = TrainerTests.Config(tmp, LearningTests.TinyModel, "out", "--max_train_steps", "2", "--max_token_length", "225");
            c.TrainDataDir = Path.Combine(tmp.Path, "data");
            using var t = new SdTrainer(c);
            return t.Train();
        });
        Assert.All(result.Losses, l => Assert.True(double.IsFinite(l) && l > 0));
        using (var f = SafetensorsFile.Open(result.AdapterPath))
            Assert.Equal("225", f.Metadata["ss_max_token_length"]);

        // SDXL: both encoders chunked, the pooled embedding of each caption's first chunk
        var sdxl = TrainerTests.OneThread(() =>
        {
            var c = TrainerTests.Config(tmp, ReferenceData.PathOf("sdxl", "model", "diffusers"), "out-xl", "--max_train_steps", "1", "--max_token_length", "150");
            c.TrainDataDir = Path.Combine(tmp.Path, "data");
            using var t = new SdTrainer(c);
            return t.Train();
        });
        Assert.All(sdxl.Losses, l => Assert.True(double.IsFinite(l) && l > 0));
    }

    [Fact]
    public void Kohya_ss_gui_configs_load_their_no_effect_options_are_reported_and_no_half_vae_keeps_the_vae_in_float32()
    {
        using var tmp = new TempDir();
        var c = TrainerTests.Config(tmp, LearningTests.TinyModel, "out", "--max_train_steps", "1", "--mixed_precision", "bf16", "--no_half_vae");
        var gui = SdTrainConfig.FromTomlText("""
            xformers = true
            sdpa = true
            max_data_loader_n_workers = 0
            persistent_data_loader_workers = true
            logging_dir = "/workspace/kohya_ss/logs"
            dynamo_backend = "no"
            lr_scheduler_args = []
            noise_offset_type = "Original"
            epoch = 15
            lowram = false
            vae = ""
            """, "gui.toml");
        Assert.Equal(10, gui.IgnoredOptions.Count);
        Assert.Null(gui.Vae);
        Assert.Contains(gui.IgnoredOptions, o => o.StartsWith("xformers (", StringComparison.Ordinal));
        foreach (var (key, bad) in new[] { ("noise_offset_type", "noise_offset_type = \"Pyramid\""), ("dynamo_backend", "dynamo_backend = \"inductor\""), ("fp8_base", "fp8_base = true") })
        {
            var e = Assert.Throws<LoraSharpException>(() => SdTrainConfig.FromTomlText(bad, "gui.toml"));
            Assert.Equal(key, e.Key);
            Assert.Contains("only", e.Message);
        }
        c.ApplyArgs(["--xformers", "--max_data_loader_n_workers", "2"]);
        var (vae, unet, ignored) = TrainerTests.OneThread(() =>
        {
            using var t = new SdTrainer(c);
            t.Train();
            return (t.Pipeline.Model.Vae!.parameters().First().dtype, t.Pipeline.Model.Unet.parameters().First().dtype, c.IgnoredOptions.Count);
        });
        Assert.Equal(ScalarType.Float32, vae);
        Assert.Equal(ScalarType.BFloat16, unet);
        Assert.Equal(2, ignored);
    }

    [Fact]
    public void Flip_aug_caches_the_mirrored_latents_and_trains()
    {
        using var tmp = new TempDir();
        var image = Path.Combine(tmp.Path, "a.png");
        LearningTests.WritePattern(image, 64, 3);
        // the same picture mirrored, written as a file
        var mirrored = Path.Combine(tmp.Path, "b.png");
        using (var bmp = SkiaSharp.SKBitmap.Decode(image))
        using (var flipped = new SkiaSharp.SKBitmap(bmp.Info))
        {
            for (int y = 0; y < bmp.Height; y++)
                for (int x = 0; x < bmp.Width; x++) flipped.SetPixel(bmp.Width - 1 - x, y, bmp.GetPixel(x, y));
            using var data = flipped.Encode(SkiaSharp.SKEncodedImageFormat.Png, 100);
            File.WriteAllBytes(mirrored, data.ToArray());
        }
        using var model = LoraSharp.Models.StableDiffusion.StableDiffusionModel.Load(LearningTests.TinyModel);
        var placement = new BucketManager((64, 64), false).Place(64, 64);
        var folder = new ConceptFolder(tmp.Path, "1_x", 1, "x", false);
        PlacedImage Placed(string path) => new(new TrainImage(path, "x", folder), placement, 64, 64);
        manual_seed(5);
        using var viaFlag = LatentCache.Encode(model.Vae!, [Placed(image)], flipped: true);
        manual_seed(5);
        using var viaFile = LatentCache.Encode(model.Vae!, [Placed(mirrored)]);
        Assert.True((viaFlag - viaFile).abs().max().item<float>() < 1e-5);
        using var cache = new LatentCache(model.Vae!, null, keepInMemory: true);
        using (var a = cache.Get(Placed(image)))
        using (var b = cache.Get(Placed(image), flipped: true))
            Assert.True((a - b).abs().max().item<float>() > 1e-3);
        Assert.Equal(2, cache.Count);

        var result = TrainerTests.OneThread(() =>
        {
            using var t = new SdTrainer(TrainerTests.Config(tmp, LearningTests.TinyModel, "out", "--max_train_steps", "2", "--flip_aug"));
            return t.Train();
        });
        Assert.All(result.Losses, l => Assert.True(double.IsFinite(l) && l > 0));
        using var f = SafetensorsFile.Open(result.AdapterPath);
        Assert.Equal("True", f.Metadata["ss_flip_aug"]);
    }

    [Fact]
    public void Block_learning_rate_weights_follow_kohyas_presets_and_give_each_block_its_group()
    {
        double Sin(int i) => Math.Sin(Math.PI * i / 11 / 2);
        Assert.Equal(Enumerable.Range(0, 12).Select(Sin), NetworkSpec.BlockLrList("sine"), new ToleranceComparer());
        Assert.Equal(Enumerable.Range(0, 12).Reverse().Select(Sin), NetworkSpec.BlockLrList("cosine"), new ToleranceComparer());
        Assert.Equal(Enumerable.Range(0, 12).Select(i => i / 11.0 + 0.5), NetworkSpec.BlockLrList("linear+0.5"), new ToleranceComparer());
        Assert.Equal(Enumerable.Range(0, 12).Select(i => (11 - i) / 11.0), NetworkSpec.BlockLrList("reverse_linear"), new ToleranceComparer());
        Assert.Equal(Enumerable.Repeat(0.0, 12), NetworkSpec.BlockLrList("zeros"));
        Assert.Equal(new[] { 2.0, 0.5 }.Concat(Enumerable.Repeat(1.0, 10)), NetworkSpec.BlockLrList("2,0.5"));
        Assert.Throws<FormatException>(() => NetworkSpec.BlockLrList("triangle"));

        using var tmp = new TempDir();
        var down = string.Join(",", Enumerable.Repeat("0.5", 12));
        var groups = TrainerTests.OneThread(() =>
        {
            using var t = new SdTrainer(TrainerTests.Config(tmp, LearningTests.TinyModel, "out", "--max_train_steps", "1", "--network_train_unet_only",
                "--unet_lr", "1e-3", "--network_args", $"down_lr_weight={down}", "mid_lr_weight=2", "up_lr_weight=zeros"));
            t.Train();
            // up blocks (weight 0) have no modules
            Assert.DoesNotContain(t.Host!["lora"].Modules, m => m.ModulePath.StartsWith("unet.up_blocks.", StringComparison.Ordinal));
            Assert.Contains(t.Host!["lora"].Modules, m => m.ModulePath.StartsWith("unet.down_blocks.", StringComparison.Ordinal));
            return t.Optimizer!.Groups.ToDictionary(g => g.Name, g => g.BaseLearningRate);
        });
        Assert.Equal(5e-4, groups["unet_lr0.5"], 12);
        Assert.Equal(2e-3, groups["unet_lr2"], 12);
        Assert.Equal(2, groups.Count);
    }

    [Fact]
    public void Cached_text_encoder_outputs_give_the_same_training_as_encoding_every_step()
    {
        using var tmp = new TempDir();
        (IReadOnlyList<double> Losses, int Cached) Run(bool cache)
        {
            using var t2 = new TempDir();
            return TrainerTests.OneThread(() =>
            {
                var args = new List<string> { "--max_train_steps", "3", "--network_train_unet_only" };
                if (cache) args.Add("--cache_text_encoder_outputs");
                using var t = new SdTrainer(TrainerTests.Config(t2, LearningTests.TinyModel, "out", [.. args]));
                var r = t.Train();
                return (r.Losses, t.CachedTextEncoderOutputs);
            });
        }
        var plain = Run(false);
        var cached = Run(true);
        Assert.Equal(0, plain.Cached);
        Assert.Equal(2, cached.Cached); // the two distinct captions of the dataset
        Assert.Equal(plain.Losses, cached.Losses);

        var e = Assert.Throws<LoraSharpException>(() => TrainerTests.Config(tmp, LearningTests.TinyModel, "out", "--cache_text_encoder_outputs").Validate());
        Assert.Equal("cache_text_encoder_outputs", e.Key);
        e = Assert.Throws<LoraSharpException>(() => TrainerTests.Config(tmp, LearningTests.TinyModel, "out", "--cache_text_encoder_outputs", "--network_train_unet_only", "--shuffle_caption").Validate());
        Assert.Contains("fixed captions", e.Message);
    }

    [Fact]
    public void Several_datasets_keep_their_resolution_and_batch_size_and_never_share_a_batch()
    {
        using var tmp = new TempDir();
        var toml = DatasetToml(tmp, extraTables: """
            [[datasets]]
            resolution = 32
            batch_size = 3
            enable_bucket = false

              [[datasets.subsets]]
              image_dir = "imgs"
              num_repeats = 2
              class_tokens = "sks"
            """).Replace("\\", "/");
        var c = DatasetRun(tmp, toml, "--max_train_steps", "2");
        var data = TrainingDataset.Load(c);
        Assert.Equal(2, data.Parts.Count);
        Assert.Equal((2, 3), (data.Parts[0].BatchSize, data.Parts[1].BatchSize));
        Assert.All(data.Parts[0].Train, p => Assert.Equal((64, 64), p.Bucket));
        Assert.All(data.Parts[1].Train, p => Assert.Equal((32, 32), p.Bucket));
        Assert.Equal((64, 64), c.Resolution); // the first dataset's values are the run's
        Assert.Equal(3, data.MaxBatchSize);
        var batches = data.EpochBatches(c.TrainBatchSize, new Random(1));
        Assert.All(batches, b => Assert.Single(b.Select(p => p.Bucket).Distinct()));
        Assert.Contains(batches, b => b[0].Bucket == (32, 32) && b.Count == 3);
        Assert.All(batches.Where(b => b[0].Bucket == (64, 64)), b => Assert.True(b.Count <= 2));
        // dataset 1: 12 train + 12 reg samples in batches of 2; dataset 2: 6 samples in batches of 3
        Assert.Equal(12 + 2, data.BatchesPerEpoch(c.TrainBatchSize));
        Assert.Equal(14, batches.Count);

        var result = TrainerTests.OneThread(() =>
        {
            using var t = new SdTrainer(DatasetRun(tmp, toml, "--max_train_steps", "3"));
            return t.Train();
        });
        Assert.Equal(3, result.Steps);
        Assert.All(result.Losses, l => Assert.True(double.IsFinite(l) && l > 0));
    }

    [Fact]
    public void Random_crop_moves_the_window_over_the_whole_resized_image_and_trains_without_cached_latents()
    {
        var placement = new BucketManager((64, 64), false).Place(96, 64); // covered: 96×64 resized, a 64×64 window
        Assert.Equal((96, 64, 16, 0), (placement.ResizedWidth, placement.ResizedHeight, placement.CropLeft, placement.CropTop));
        var image = new PlacedImage(new TrainImage("x.png", "x", new ConceptFolder("/d", "1_x", 1, "x", false)), placement, 96, 64);
        var rng = new Random(3);
        var lefts = Enumerable.Range(0, 400).Select(_ => SdTrainer.RandomCrop(image, rng).Placement).ToList();
        Assert.All(lefts, p => Assert.Equal(0, p.CropTop));
        Assert.Equal(0, lefts.Min(p => p.CropLeft));
        Assert.Equal(32, lefts.Max(p => p.CropLeft));
        Assert.True(lefts.Select(p => p.CropLeft).Distinct().Count() > 25);

        using var tmp = new TempDir();
        var result = TrainerTests.OneThread(() =>
        {
            using var t = new SdTrainer(TrainerTests.Config(tmp, LearningTests.TinyModel, "out", "--max_train_steps", "2", "--random_crop"));
            return t.Train();
        });
        Assert.All(result.Losses, l => Assert.True(double.IsFinite(l) && l > 0));
        using (var f = SafetensorsFile.Open(result.AdapterPath))
        {
            Assert.Equal("True", f.Metadata["ss_random_crop"]);
            Assert.Equal("False", f.Metadata["ss_cache_latents"]);
        }
        var e = Assert.Throws<LoraSharpException>(() => TrainerTests.Config(tmp, LearningTests.TinyModel, "out2", "--random_crop", "--cache_latents").Validate());
        Assert.Equal("random_crop", e.Key);
    }

    [Fact]
    public void Token_warmup_shows_a_growing_prefix_of_the_tags_as_kohya_does()
    {
        // 10 tags: keep 1, then min 2 of the remaining 9 at step 0, growing to all by step 7 (warm-up over 7 steps)
        var caption = string.Join(", ", Enumerable.Range(0, 10).Select(i => $"t{i}"));
        var p = new CaptionProcessor(new CaptionSettings(KeepTokens: 1, TokenWarmupMin: 2, TokenWarmupStep: 7));
        int Count(long step) => p.Process(caption, new Random(1), step: step).Split(", ").Length;
        // kohya: ⌊step·(9 − 2)/7⌋ + 2 flexible tags, plus the kept one
        Assert.Equal(new[] { 3, 4, 5, 6, 7, 8, 9, 10, 10 }, Enumerable.Range(0, 9).Select(s => Count(s)));
        Assert.Equal("t0, t1, t2", p.Process(caption, new Random(1), step: 0)); // the prefix, in order (no shuffle)
        // a fraction of the run: 0.5 of 14 steps = 7 steps
        var ratio = new CaptionProcessor(new CaptionSettings(KeepTokens: 1, TokenWarmupMin: 2, TokenWarmupStep: 0.5)) { TotalSteps = 14 };
        Assert.Equal(3, ratio.Process(caption, new Random(1), step: 0).Split(", ").Length);
        Assert.Equal(10, ratio.Process(caption, new Random(1), step: 7).Split(", ").Length);

        using var tmp = new TempDir();
        var result = TrainerTests.OneThread(() =>
        {
            using var t = new SdTrainer(TrainerTests.Config(tmp, LearningTests.TinyModel, "out", "--max_train_steps", "2", "--token_warmup_step", "0.5", "--token_warmup_min", "1"));
            return t.Train();
        });
        Assert.All(result.Losses, l => Assert.True(double.IsFinite(l) && l > 0));
    }

    [Fact]
    public void Wildcards_prefixes_and_multi_line_captions_follow_kohya()
    {
        var rng = new Random(2);
        var seen = Enumerable.Range(0, 300).Select(_ => CaptionProcessor.Wildcards("a {red|green|blue} star, {{literal}}", rng)).ToHashSet();
        Assert.Equal(new HashSet<string> { "a red star, {literal}", "a green star, {literal}", "a blue star, {literal}" }, seen);
        var lines = Enumerable.Range(0, 300).Select(_ => CaptionProcessor.Wildcards("first line\nsecond {x|y}", rng)).ToHashSet();
        Assert.Equal(new HashSet<string> { "first line", "second x", "second y" }, lines);

        var p = new CaptionProcessor(new CaptionSettings(Wildcard: true, Prefix: "photo of", Suffix: "masterpiece"));
        var c = p.Process("sks {dog|cat}", new Random(1));
        Assert.Matches("^photo of sks (dog|cat) masterpiece$", c);
        // without enable_wildcard, braces stay and only the first line of a caption file is read
        Assert.Equal("sks {dog|cat}", new CaptionProcessor(new CaptionSettings()).Process("sks {dog|cat}", new Random(1)));

        using var tmp = new TempDir();
        var img = Path.Combine(tmp.Path, "a.png");
        LearningTests.WritePattern(img, 64, 1);
        File.WriteAllText(Path.Combine(tmp.Path, "a.txt"), "one\n\ntwo\n");
        Assert.Equal("one", FolderDataset.ReadCaption(img, ".txt"));
        Assert.Equal("one\ntwo", FolderDataset.ReadCaption(img, ".txt", allLines: true));

        var result = TrainerTests.OneThread(() =>
        {
            using var t = new SdTrainer(TrainerTests.Config(tmp, LearningTests.TinyModel, "out", "--max_train_steps", "2", "--enable_wildcard", "--caption_prefix", "photo of"));
            return t.Train();
        });
        Assert.All(result.Losses, l => Assert.True(double.IsFinite(l) && l > 0));
    }

    [Fact]
    public void Keep_tokens_separator_fixes_head_and_tail_and_secondary_separator_keeps_tags_together()
    {
        var p = new CaptionProcessor(new CaptionSettings(Shuffle: true, KeepTokens: 5, KeepTokensSeparator: "|||", SecondarySeparator: ";;;"));
        var rng = new Random(4);
        var seen = new HashSet<string>();
        for (int i = 0; i < 200; i++)
        {
            var c = p.Process("sks, girl ||| red;;;hat, blue, green ||| masterpiece", rng);
            Assert.StartsWith("sks, girl, ", c);         // before the separator: fixed (keep_tokens is not used)
            Assert.EndsWith(", masterpiece", c);         // after a second separator: fixed at the end
            Assert.Contains("red,hat", c);               // joined by the secondary separator: moves as one tag
            seen.Add(c);
        }
        Assert.Equal(6, seen.Count);                     // 3 flexible tags: every order appears
        // without shuffling or dropout kohya leaves the caption as written
        Assert.Equal("a ||| b", new CaptionProcessor(new CaptionSettings(KeepTokensSeparator: "|||")).Process("a ||| b", rng));
        // another tag separator
        Assert.Equal("x, y", new CaptionProcessor(new CaptionSettings(Shuffle: true, KeepTokens: 2, Separator: ";")).Process("x; y", rng));
    }

    sealed class ToleranceComparer : IEqualityComparer<double>
    {
        public bool Equals(double a, double b) => Math.Abs(a - b) < 1e-12;
        public int GetHashCode(double d) => 0;
    }
}
