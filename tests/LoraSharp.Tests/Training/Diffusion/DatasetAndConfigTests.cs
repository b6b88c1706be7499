using LoraSharp.Tests.Infrastructure;
using LoraSharp.Training.Diffusion;
using SkiaSharp;

namespace LoraSharp.Tests.Training.Diffusion;

public class DatasetAndConfigTests
{
    [Theory]
    [InlineData("10_sks dog", 10, "sks dog")]
    [InlineData("1_a", 1, "a")]
    [InlineData("3_with_underscores x", 3, "with_underscores x")]
    [InlineData("007_bond", 7, "bond")]
    public void Folder_names_give_repeats_and_class_tokens(string name, int repeats, string tokens)
    {
        var p = FolderDataset.ParseFolderName(name);
        Assert.NotNull(p);
        Assert.Equal(repeats, p!.Value.Repeats);
        Assert.Equal(tokens, p.Value.ClassTokens);
    }

    [Theory]
    [InlineData("dog")]
    [InlineData("x_10")]
    [InlineData("_dog")]
    public void Folders_without_the_convention_are_not_concepts(string name) => Assert.Null(FolderDataset.ParseFolderName(name));

    [Fact]
    public void Captions_come_from_sidecar_files_else_from_the_folder()
    {
        using var tmp = new TempDir();
        var dir = Directory.CreateDirectory(Path.Combine(tmp.Path, "2_sks cat")).FullName;
        Directory.CreateDirectory(Path.Combine(tmp.Path, "notes"));
        LearningTests.WritePattern(Path.Combine(dir, "a.png"), 64, 1);
        LearningTests.WritePattern(Path.Combine(dir, "b.png"), 64, 2);
        File.WriteAllText(Path.Combine(dir, "a.txt"), "sks cat, sitting, red\n");
        var skipped = new List<string>();
        var folders = FolderDataset.Concepts(tmp.Path, false, skipped);
        Assert.Single(folders);
        Assert.Contains(skipped, s => s.Contains("notes"));
        var images = FolderDataset.Images(folders[0], ".txt");
        Assert.Equal("sks cat, sitting, red", images.Single(i => i.Path.EndsWith("a.png")).Caption);
        Assert.Equal("sks cat", images.Single(i => i.Path.EndsWith("b.png")).Caption);
        var freq = FolderDataset.TagFrequency(images);
        Assert.Equal(2, freq["2_sks cat"]["sks cat"]);
        Assert.Equal(1, freq["2_sks cat"]["red"]);
    }

    [Fact]
    public void Caption_shuffle_keeps_the_first_tokens_and_dropout_empties()
    {
        var p = new CaptionProcessor(shuffle: true, keepTokens: 2, dropoutRate: 0);
        var rng = new Random(3);
        var seen = new HashSet<string>();
        for (int i = 0; i < 50; i++)
        {
            var s = p.Process("sks, dog, a, b, c, d", rng);
            Assert.StartsWith("sks, dog, ", s);
            Assert.Equal(["a", "b", "c", "d"], s.Split(", ").Skip(2).Order());
            seen.Add(s);
        }
        Assert.True(seen.Count > 5);
        var drop = new CaptionProcessor(false, 0, 1.0);
        Assert.Equal("", drop.Process("x, y", rng));
        var none = new CaptionProcessor(false, 0, 0);
        Assert.Equal("x,y , z", none.Process("x,y , z", rng));
    }

    [Fact]
    public void Bucket_resolutions_follow_kohya_for_512()
    {
        var r = BucketManager.MakeBucketResolutions((512, 512), 256, 1024, 64);
        Assert.Contains((512, 512), r);
        Assert.Contains((256, 1024), r);
        Assert.Contains((1024, 256), r);
        Assert.Contains((448, 576), r);
        Assert.Contains((576, 448), r);
        Assert.Contains((384, 640), r);
        Assert.All(r, b => Assert.True(b.W * b.H <= 512 * 512 && b.W % 64 == 0 && b.H % 64 == 0 && b.W >= 256 && b.H >= 256 && b.W <= 1024 && b.H <= 1024));
        Assert.Equal(r.Distinct().Count(), r.Count);
    }

    [Fact]
    public void Images_go_to_the_closest_aspect_ratio_cover_and_center_crop()
    {
        var m = new BucketManager((512, 512), enabled: true);
        var p = m.Place(1200, 800); // AR 1.5 → 640x384 (1.667) vs 576x448 (1.286): |0.167| < |0.214|
        // the image is narrower than the bucket's ratio: scale by width 640/1200 → 640x427, crop 21 rows at the top
        Assert.Equal(new BucketPlacement(640, 384, 640, 427, 0, 21), p);
        // square image into square bucket, no crop
        var q = m.Place(1024, 1024);
        Assert.Equal(new BucketPlacement(512, 512, 512, 512, 0, 0), q);
        // without buckets: cover the resolution and crop the middle
        var fixedRes = new BucketManager((512, 512), enabled: false).Place(1000, 500);
        Assert.Equal(new BucketPlacement(512, 512, 1024, 512, 256, 0), fixedRes);
        // no_upscale: a small image keeps its size rounded down to the step
        var nu = new BucketManager((512, 512), true, noUpscale: true).Place(300, 200);
        Assert.Equal((256, 192), (nu.BucketWidth, nu.BucketHeight));
    }

    [Fact]
    public void Bad_images_are_reported_with_their_problem()
    {
        using var tmp = new TempDir();
        var broken = tmp.File("broken.png");
        File.WriteAllBytes(broken, [0x89, 0x50, 0x4E, 0x47, 1, 2, 3]);
        Assert.Equal(ImageProblem.Unreadable, TrainImageLoader.Check(broken, 32).Problem);
        var tiny = tmp.File("tiny.png");
        LearningTests.WritePattern(tiny, 16, 0);
        Assert.Equal(ImageProblem.Tiny, TrainImageLoader.Check(tiny, 32).Problem);
        var alpha = tmp.File("alpha.png");
        using (var bmp = new SKBitmap(new SKImageInfo(64, 64, SKColorType.Rgba8888, SKAlphaType.Unpremul)))
        {
            bmp.Erase(new SKColor(10, 20, 30, 100));
            using var d = bmp.Encode(SKEncodedImageFormat.Png, 100);
            File.WriteAllBytes(alpha, d.ToArray());
        }
        Assert.Equal(ImageProblem.Transparent, TrainImageLoader.Check(alpha, 32).Problem);
        // a minimal JPEG header whose frame declares 4 components (CMYK)
        var cmyk = tmp.File("cmyk.jpg");
        File.WriteAllBytes(cmyk, [0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0x00, 0x00, 0xFF, 0xC0, 0x00, 0x14, 0x08, 0x00, 0x40, 0x00, 0x40, 0x04, 1, 0x11, 0, 2, 0x11, 0, 3, 0x11, 0, 4, 0x11, 0]);
        Assert.Equal(ImageProblem.Cmyk, TrainImageLoader.Check(cmyk, 32).Problem);
        var ok = tmp.File("ok.png");
        LearningTests.WritePattern(ok, 64, 0);
        Assert.True(TrainImageLoader.Check(ok, 32).Ok);
    }

    [Fact]
    public void Image_loading_resizes_and_center_crops_to_the_bucket()
    {
        using var tmp = new TempDir();
        var path = tmp.File("wide.png");
        using (var bmp = new SKBitmap(new SKImageInfo(128, 64, SKColorType.Rgba8888, SKAlphaType.Opaque)))
        {
            for (int y = 0; y < 64; y++) for (int x = 0; x < 128; x++) bmp.SetPixel(x, y, x < 32 ? SKColors.Red : x < 96 ? SKColors.White : SKColors.Blue);
            using var d = bmp.Encode(SKEncodedImageFormat.Png, 100);
            File.WriteAllBytes(path, d.ToArray());
        }
        var p = new BucketManager((64, 64), false).Place(128, 64);
        using var t = TrainImageLoader.LoadForBucket(path, p);
        Assert.Equal(new long[] { 3, 64, 64 }, t.shape);
        // the middle 64 columns are white: every value 1
        Assert.True(t.min().item<float>() > 0.99f);
    }

    [Fact]
    public void Toml_and_flags_use_kohya_names_and_unknown_keys_fail_with_the_list()
    {
        var c = SdTrainConfig.FromTomlText("""
            [model_arguments]
            pretrained_model_name_or_path = "/m"
            v2 = true
            [dataset_arguments]
            train_data_dir = "/d"
            resolution = "768,512"
            enable_bucket = true
            [training_arguments]
            output_dir = "/o"
            network_dim = 32
            network_alpha = 16
            network_args = ["conv_dim=8", "conv_alpha=4"]
            learning_rate = 1e-4
            unet_lr = 2e-4
            optimizer_type = "Lion"
            max_train_epochs = 10
            mixed_precision = "bf16"
            seed = 1234
            """);
        Assert.Equal((768, 512), c.Resolution);
        Assert.True(c.V2 && c.EnableBucket);
        Assert.Equal(32, c.NetworkDim);
        Assert.Equal(2e-4, c.UnetLr);
        Assert.Equal(1234, c.Seed);
        var rest = c.ApplyArgs(["--network_dim", "8", "--shuffle_caption", "--keep-tokens=2", "--network_args", "conv_dim=4", "algo=loha", "--network_module", "lycoris.kohya", "extra"]);
        Assert.Equal(["extra"], rest);
        Assert.Equal(8, c.NetworkDim);
        Assert.True(c.ShuffleCaption);
        Assert.Equal(2, c.KeepTokens);
        c.Validate();
        var spec = NetworkSpec.From(c);
        Assert.Equal("loha", spec.Kind);
        Assert.Equal("lycoris.kohya", spec.KohyaModule);
        Assert.Equal(4, spec.Adapter.ConvRank);
        Assert.True(spec.Conv);

        var e = Assert.Throws<LoraSharpException>(() => SdTrainConfig.FromTomlText("learning_rat = 1e-4", "cfg.toml"));
        Assert.Contains("learning_rat", e.Message);
        Assert.Contains("learning_rate", e.Message);
        Assert.Contains("cfg.toml", e.Message);
        Assert.Contains("did you mean 'learning_rate'", e.Message);
        var bad = Assert.Throws<LoraSharpException>(() => SdTrainConfig.FromTomlText("network_dim = \"big\"", "cfg.toml"));
        Assert.Contains("network_dim", bad.Message);
        var opt = new SdTrainConfig { PretrainedModelNameOrPath = "m", TrainDataDir = "d", OutputDir = "o", OptimizerType = "SGD" };
        Assert.Contains("optimizer_type", Assert.Throws<LoraSharpException>(opt.Validate).Message);
    }

    [Fact]
    public void Network_module_names_map_to_algorithms()
    {
        SdTrainConfig C(string module, params string[] args) => new() { NetworkModule = module, NetworkArgs = args.ToList(), NetworkDim = 8, NetworkAlpha = 4 };
        Assert.Equal(("lora", "networks.lora", false), Describe(NetworkSpec.From(C("networks.lora"))));
        Assert.Equal(("lora", "networks.lora", true), Describe(NetworkSpec.From(C("lora", "conv_dim=4"))));
        Assert.Equal(("locon", "lycoris.kohya", true), Describe(NetworkSpec.From(C("locon"))));
        Assert.Equal(("lokr", "lycoris.kohya", false), Describe(NetworkSpec.From(C("lycoris.kohya", "algo=lokr"))));
        var dy = NetworkSpec.From(C("networks.dylora", "unit=2"));
        Assert.Equal(2, dy.Adapter.DyLoraUnit);
        Assert.Equal(1.0, NetworkSpec.From(C("lora", "conv_dim=4")).Adapter.ConvAlpha); // kohya: conv_alpha defaults to 1
        Assert.Throws<LoraSharpException>(() => NetworkSpec.From(C("networks.oft")));
        Assert.Throws<LoraSharpException>(() => NetworkSpec.From(C("lycoris.kohya", "algo=ia3")));
        static (string, string, bool) Describe(NetworkSpec s) => (s.Kind, s.KohyaModule, s.Conv);
    }

    [Fact]
    public void Kohya_targets_select_transformer_children_resnet_convs_and_clip_linears()
    {
        var spec = NetworkSpec.From(new SdTrainConfig { NetworkArgs = ["conv_dim=4"] });
        var unet = spec.UnetSelector();
        Assert.True(unet.Matches("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"));
        Assert.True(unet.Matches("unet.mid_block.attentions.0.proj_in"));
        Assert.True(unet.Matches("unet.up_blocks.1.resnets.2.conv1"));
        Assert.True(unet.Matches("unet.down_blocks.1.downsamplers.0.conv"));
        Assert.True(unet.Matches("unet.mid_block.resnets.1.time_emb_proj"));
        Assert.False(unet.Matches("unet.conv_in"));
        Assert.False(unet.Matches("unet.time_embedding.linear_1"));
        Assert.False(NetworkSpec.From(new SdTrainConfig()).UnetSelector().Matches("unet.up_blocks.1.resnets.2.conv1"));
        var te = NetworkSpec.TextEncoderSelector();
        Assert.True(te.Matches("text_encoder.text_model.encoder.layers.11.self_attn.out_proj"));
        Assert.True(te.Matches("text_encoder_2.text_model.encoder.layers.0.mlp.fc2"));
        Assert.False(te.Matches("text_encoder_2.text_projection"));
        Assert.False(te.Matches("text_encoder.text_model.embeddings.token_embedding"));
    }

    [Fact]
    public void Prompt_files_parse_kohya_options()
    {
        var p = SamplePromptFile.Parse([
            "# comment",
            "",
            "a photo of sks dog, best quality --n blurry, lowres --w 768 --h 515 --s 25 --l 6.5 --d 42 --ss euler_a",
            "plain prompt",
        ]);
        Assert.Equal(2, p.Count);
        Assert.Equal(new SamplePrompt("a photo of sks dog, best quality", "blurry, lowres", 768, 512, 25, 6.5, 42, "euler_a", 3), p[0]);
        Assert.Equal(new SamplePrompt("plain prompt", "", 512, 512, 30, 7.5, null, null, 4), p[1]);
        Assert.Equal(1000, SamplePromptFile.Parse(["x --s 5000"])[0].Steps);
        var e = Assert.Throws<LoraSharpException>(() => SamplePromptFile.Parse(["x --w wide"], "p.txt"));
        Assert.Contains("line 1", e.Message);
        Assert.Throws<LoraSharpException>(() => SamplePromptFile.Parse(["x --zz 1"]));
    }

    [Fact]
    public void Epoch_batches_repeat_images_balance_regularisation_and_stay_in_one_bucket()
    {
        var train = new ConceptFolder("/t/3_a", "3_a", 3, "a", false);
        var reg = new ConceptFolder("/r/1_b", "1_b", 1, "b", true);
        var m = new BucketManager((512, 512), true);
        PlacedImage P(string name, ConceptFolder f, int w, int h) => new(new TrainImage(name, f.ClassTokens, f), m.Place(w, h), w, h);
        var ds = new TrainingDataset
        {
            Train = [P("1", train, 512, 512), P("2", train, 800, 400)],
            Regularization = [P("r", reg, 512, 512)],
            Folders = [train, reg], Problems = [], Buckets = m,
        };
        var batches = ds.EpochBatches(2, new Random(1));
        var all = batches.SelectMany(b => b).ToList();
        Assert.Equal(6, all.Count(p => !p.Image.IsRegularization));
        Assert.Equal(6, all.Count(p => p.Image.IsRegularization));
        Assert.All(batches, b => Assert.Single(b.Select(p => p.Bucket).Distinct()));
        Assert.Equal(ds.BatchesPerEpoch(2), batches.Count);
    }

    [Fact]
    public void Memory_plan_turns_on_checkpointing_and_8bit_states_when_memory_is_short()
    {
        var unet = new LoraSharp.Models.StableDiffusion.UNetConfig();
        var input = new MemoryPlanInput
        {
            Unet = unet, ModelBytes = 4_000_000_000, AdapterParameters = 3_000_000, BatchSize = 1, MaxImageSize = (512, 512), ActivationBytes = 4, Optimizer = "AdamW",
        };
        var roomy = MemoryPlanner.Plan(input, availableBytes: 200_000_000_000);
        Assert.False(roomy.GradientCheckpointing);
        var (plain, ckpt) = MemoryPlanner.ActivationEstimate(unet, 1, 64, 64, 4, 77);
        Assert.True(ckpt < plain / 3, $"{ckpt} vs {plain}");
        var tight = MemoryPlanner.Plan(input, availableBytes: (long)((4_000_000_000 + ckpt + 600_000_000) / 0.85));
        Assert.True(tight.GradientCheckpointing);
        Assert.Contains("gradient checkpointing on", tight.ToString());
        var tighter = MemoryPlanner.Plan(input, availableBytes: (long)((4_000_000_000 + ckpt + 400_000_000 + 24_000_000) / 0.85));
        Assert.True(tighter.GradientCheckpointing && tighter.EightBitOptimizer);
        Assert.True(MemoryPlanner.AvailableBytes() > 0);
    }
}
